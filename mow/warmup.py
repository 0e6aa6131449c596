"""MoW's warm-up stage (SPEC §1.8): fixed random-policy data, offline pretraining of one
shared VAE and head set, per-task gradient signatures and the task clusters.

    collect   one random-policy replay per task (legal actions only; continuous actions
              uniform in [-1, 1]), stored once per
              (scale, suite, protocol, seed) and shared by every variant
    pretrain  a MoW world model with a single cluster (one VAE, one head set) trained
              offline on that data; batches cycle through the tasks so each gets the same
              share. Resumable: a killed pretrain continues from its last checkpoint.
    cluster   gradient of every task's loss w.r.t. the shared VAE and head parameters,
              averaged per layer and over `cluster_batches` mini-batches, cosine
              similarity, agglomerative clustering into N_m groups -> clusters.json.
              The `no_clustering` ablation permutes that assignment (same cluster sizes).

Every output is written atomically, so a step either produced its file or did not.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mow import checkpoint
from mow.clustering import (cluster_tasks, cosine_similarity_matrix, random_clusters_like,
                            task_gradient_signatures, write_clusters_json)
from mow.config import ConfigError, Params
from mow.envs import action_spec, legal_action_mask, make_env, shared_action_spec
from mow.envs.vector import VectorEnv
from mow.models.mow_world_model import MoWWorldModel
from mow.policy import random_actions
from mow.replay import ReplayBuffer
from mow.runtime import adam, make_runtime, rng_state, seed_everything, set_rng_state
from mow.train import TrainingDiverged

DATA_FORMAT = 1
PRETRAIN_FORMAT = 1
PRETRAIN_CHECKPOINT_EVERY = 500  # updates between resumable pretrain checkpoints


def check_suite_tasks(params: Params, suite: str) -> tuple[str, ...]:
    """The suite's tasks, refusing duplicates and more clusters than tasks (one-line errors)."""
    tasks = params.tasks(suite)
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise ConfigError(f"suites.{suite}.tasks: duplicate task(s) {', '.join(dupes)}")
    n_m = params["model"]["mow"]["num_clusters"]
    if n_m > len(tasks):
        raise ConfigError(f"model.mow.num_clusters: {n_m} clusters for {len(tasks)} tasks of suite '{suite}' "
                          f"(N_m must not exceed the number of tasks)")
    return tasks


def check_clusters_file(path: Path, tasks, params: Params):
    """Read clusters.json for these tasks and N_m; a mismatch is a one-line ConfigError."""
    from mow.clustering import read_clusters_json

    try:
        clusters = read_clusters_json(path, tasks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    n_m = params["model"]["mow"]["num_clusters"]
    if clusters.num_clusters != n_m:
        raise ConfigError(f"{path}: holds {clusters.num_clusters} clusters, model.mow.num_clusters is {n_m}; "
                          f"delete it and rerun `mow cluster`")
    return clusters


def action_masks(suite: str, tasks, num_actions: int) -> torch.Tensor | None:
    """Bool [K, num_actions] legal actions per task over the shared set; None for a
    continuous suite (Meta-World: every task has the same Box(-1, 1) action)."""
    if shared_action_spec(suite, tasks)[1]:
        return None
    masks = np.stack([legal_action_mask(suite, t, full_action_space=True) for t in tasks])
    if masks.shape[1] != num_actions:
        raise ValueError(f"{suite}: action masks have {masks.shape[1]} entries, the envs {num_actions} actions")
    return torch.from_numpy(masks)


def random_legal_actions(rng: np.random.Generator, masks: np.ndarray | None, task_of_env: np.ndarray,
                         action_dim: int = 0) -> np.ndarray:
    """One uniformly random legal action per env (env i plays task `task_of_env[i]`); with
    `masks` None (continuous suite) a float32 action uniform in [-1, 1]^action_dim per env."""
    if masks is None:
        return random_actions(rng, len(task_of_env), action_dim, continuous=True)
    legal = [np.flatnonzero(masks[t]) for t in task_of_env]
    return np.array([ids[rng.integers(len(ids))] for ids in legal], dtype=np.int64)


# -- collect ----------------------------------------------------------------------------
def collect(params: Params, suite: str, protocol_name: str, seed: int, out: Path, *, progress: bool = True,
            log=print) -> Path:
    """Random-policy replay of `warmup.collect_steps` agent steps per task (one env each)."""
    tasks = check_suite_tasks(params, suite)
    protocol = params.protocol(protocol_name)
    steps = params["warmup"]["collect_steps"]
    seed_everything(seed)
    envs = VectorEnv([partial(make_env, suite, task, protocol, seed=seed * 100_000 + 100 * k, train=True,
                              full_action_space=True) for k, task in enumerate(tasks)])
    size, continuous = action_spec(envs.single_action_space)
    masks = action_masks(suite, tasks, size)
    masks = None if masks is None else masks.numpy()
    task_of_env = np.arange(len(tasks))
    replay = ReplayBuffer(steps * len(tasks), len(tasks), envs.single_observation_space.shape, seed=seed,
                          action_dim=size if continuous else 0)
    rng = np.random.default_rng(seed)
    obs = envs.reset(seed=seed * 100_000)
    bar = _bar(progress, steps, f"collect {suite}/seed{seed}")
    try:
        for n in range(steps):
            actions = random_legal_actions(rng, masks, task_of_env, size)
            step = envs.step(actions)
            if not np.isfinite(step.reward).all():  # it would poison every later loss, far from here
                bad = np.flatnonzero(~np.isfinite(step.reward))
                raise TrainingDiverged(
                    f"collect {suite}/seed{seed}: the environment returned a non-finite reward at step {n + 1} "
                    f"({', '.join(f'task {tasks[task_of_env[i]]}: {step.reward[i]}' for i in bad)}); "
                    "nothing was written")
            terminal = step.terminated | (step.life_loss if protocol.get("life_loss_termination") else False)
            replay.add(obs, actions, step.reward, terminal)
            obs = step.obs
            if bar is not None:
                bar.update(1)
    finally:
        envs.close()
        if bar is not None:
            bar.close()
    checkpoint.save(out, {"format": DATA_FORMAT, "suite": suite, "tasks": list(tasks), "protocol": protocol_name,
                          "protocol_config": dict(protocol), "seed": seed, "steps_per_task": steps,
                          "replay": replay.state_dict()}, keep_previous=False)
    log(f"collected {steps} random steps for each of {len(tasks)} {suite} tasks -> {out}")
    return out


def load_data(path: Path, tasks, device: torch.device, steps: int | None = None) -> ReplayBuffer:
    if not Path(path).is_file():
        raise checkpoint.CheckpointError(f"warm-up data not found: {path} (run `mow collect` first)")
    data = checkpoint.load(path)
    if data.get("format") != DATA_FORMAT or list(data["tasks"]) != list(tasks):
        raise checkpoint.CheckpointError(f"{path}: collected for tasks {data.get('tasks')}, not {list(tasks)}")
    if steps is not None and data["steps_per_task"] != steps:
        raise checkpoint.CheckpointError(f"{path}: holds {data['steps_per_task']} steps per task, warmup.collect_steps "
                                         f"is {steps}; rerun `mow collect`")
    state = data["replay"]
    obs_shape = tuple(state["obs"].shape[2:])
    replay = ReplayBuffer(state["rows"] * state["num_envs"], state["num_envs"], obs_shape, device=device,
                          action_dim=state.get("action_dim", 0))
    replay.load_state_dict(state)
    return replay


def _bar(progress: bool, total: int, desc: str, initial: int = 0):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
                file=sys.stderr)


# -- pretrain ---------------------------------------------------------------------------
def warmup_model(params: Params, num_tasks: int, num_actions: int, continuous: bool = False) -> MoWWorldModel:
    """The variant's MoW world model with a single VAE/head cluster (the shared warm-up model)."""
    cfg = dataclasses.replace(params.mow_config(num_tasks), num_clusters=1)
    return MoWWorldModel(cfg, num_actions, continuous)


def pretrain(params: Params, suite: str, seed: int, data: Path, out: Path, *, progress: bool = True,
             log=print) -> Path:
    """Train the shared warm-up model offline for `warmup.pretrain_steps` updates."""
    tasks = check_suite_tasks(params, suite)
    runtime = make_runtime(params["train"])
    device = runtime.device
    seed_everything(seed)
    replay = load_data(data, tasks, device, params["warmup"]["collect_steps"])
    model = warmup_model(params, len(tasks), *shared_action_spec(suite, tasks)).to(device)
    cfg, wu = params["train"], params["warmup"]
    opt = adam(model.parameters(), lr=cfg["wm_lr"], eps=cfg["wm_eps"])
    model_loss = runtime.world_model_loss(model, log)
    state_file = out.with_name(out.stem + ".state.ckpt")
    step = 0
    found = checkpoint.load_latest(state_file, warn=log)
    if found is not None:
        state, _ = found
        if state["params_hash"] != params.digest():
            raise checkpoint.CheckpointError(f"{state_file}: written with different parameters; delete it to restart")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        replay.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        step = state["step"]
        log(f"resumed pretraining at update {step}")
    total, batch, seq = wu["pretrain_steps"], wu["pretrain_batch"], cfg["wm_seq_len"]
    k = len(tasks)
    bar = _bar(progress, total, f"pretrain {suite}/seed{seed}", step)
    curve = []
    model.train()
    while step < total:
        task_ids = (torch.arange(batch) + step * batch) % k
        b = replay.sample(batch, seq, task_ids)  # stream k = task k
        with runtime.autocast():
            loss, metrics = model_loss(b.obs, b.actions, b.rewards, b.terminations, task_ids.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["wm_clip"])
        opt.step()
        step += 1
        curve.append(float(loss.detach()))
        if not np.isfinite(curve[-1]):
            raise RuntimeError(f"pretrain: non-finite loss at update {step}")
        if bar is not None:
            bar.update(1)
        if step % PRETRAIN_CHECKPOINT_EVERY == 0 and step < total:
            checkpoint.save(state_file, {"params_hash": params.digest(), "model": model.state_dict(),
                                         "opt": opt.state_dict(), "generator": replay.generator.get_state(),
                                         "rng": rng_state(), "step": step})
    if bar is not None:
        bar.close()
    checkpoint.save(out, {"format": PRETRAIN_FORMAT, "suite": suite, "tasks": list(tasks), "seed": seed,
                          "params_hash": params.digest(), "updates": step, "model": model.state_dict(),
                          "final_loss": curve[-1] if curve else None}, keep_previous=False)
    for stale in (state_file, state_file.with_name(state_file.name + ".prev")):
        stale.unlink(missing_ok=True)
    log(f"pretrained the shared warm-up model for {step} updates -> {out}")
    return out


def load_pretrained(path: Path, params: Params, tasks) -> dict:
    if not Path(path).is_file():
        raise checkpoint.CheckpointError(f"warm-up model not found: {path} (run `mow pretrain` first)")
    payload = checkpoint.load(path)
    if payload.get("format") != PRETRAIN_FORMAT or list(payload["tasks"]) != list(tasks):
        raise checkpoint.CheckpointError(f"{path}: pretrained for tasks {payload.get('tasks')}, not {list(tasks)}")
    return payload


# -- cluster ----------------------------------------------------------------------------
def cluster(params: Params, suite: str, seed: int, data: Path, pretrained: Path, out: Path, *, log=print) -> Path:
    """Per-task gradient signatures of the warm-up model -> clusters.json."""
    tasks = check_suite_tasks(params, suite)
    runtime = make_runtime(params["train"])
    device = runtime.device
    payload = load_pretrained(pretrained, params, tasks)
    replay = load_data(data, tasks, device, params["warmup"]["collect_steps"])
    replay.generator.manual_seed(seed)
    torch.manual_seed(seed)
    model = warmup_model(params, len(tasks), *shared_action_spec(suite, tasks)).to(device)
    model.load_state_dict(payload["model"])
    model.train()
    wu, seq = params["warmup"], params["train"]["wm_seq_len"]

    def batches(task: int):
        for _ in range(wu["cluster_batches"]):
            ids = torch.full((wu["cluster_batch"],), task, dtype=torch.long)
            yield replay.sample(wu["cluster_batch"], seq, ids), ids.to(device)

    def loss_fn(item):
        b, ids = item
        with runtime.autocast():
            return model.compute_loss(b.obs, b.actions, b.rewards, b.terminations, ids)[0]

    shared = {name: p for name, p in model.named_parameters() if name.startswith(("vaes.0.", "heads.0."))}
    signatures = task_gradient_signatures(loss_fn, [batches(k) for k in range(len(tasks))], shared)
    similarity = cosine_similarity_matrix(signatures)
    n_m = params["model"]["mow"]["num_clusters"]
    labels = cluster_tasks(similarity, n_m, seed=seed)
    method = "agglomerative-average-cosine"
    if params["model"]["mow"]["clustering"] == "random":
        labels, method = random_clusters_like(labels, seed=seed), "random-same-sizes"
    write_clusters_json(out, labels, similarity, tasks, seed=seed, method=method, num_clusters=n_m)
    groups = {c: [t for t, lab in zip(tasks, labels) if lab == c] for c in range(n_m)}
    log(f"clusters ({method}): " + "; ".join(f"{c}: {', '.join(ts)}" for c, ts in groups.items()) + f" -> {out}")
    return out


def expand_warmup_weights(warm: dict, model: MoWWorldModel) -> dict:
    """The warm-up state dict with its single VAE/head set copied into every cluster (SPEC §1.8.5)."""
    state = {}
    for key, value in warm.items():
        if key == "cluster_of_task":
            continue
        for prefix in ("vaes.0.", "heads.0."):
            if key.startswith(prefix):
                rest = key[len(prefix):]
                for c in range(model.cfg.num_clusters):
                    state[f"{prefix[:-2]}{c}.{rest}"] = value.clone()
                break
        else:
            state[key] = value
    state["cluster_of_task"] = model.cluster_of_task.clone()
    return state
