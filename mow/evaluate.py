"""Protocol-exact evaluation of a final model, written as a raw per-episode JSON file.

Episodes are split evenly over `eval_envs` parallel envs and each env plays exactly its
quota (taking the first N episodes to finish would favour short episodes). Envs are built
without the life-loss signal; the policy samples or acts greedily as the protocol says.
Returns include the final step's reward (the official STORM logger drops it).

Suites whose envs report a success flag (Meta-World, protocol `metaworld_mt50`) also get,
per episode, `success` = the flag was set at any step of the episode, and in the record
`successes` (0/1 per episode) and `success_rate` (their mean); the report's aggregate is
the mean over tasks of the per-task success rate. Meta-World episodes walk the task's 50
MT50 goals in order: episode e (counted over all eval envs, env by env) plays goal
e mod 50, so `eval_episodes: 50` evaluates every goal once.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mow import checkpoint
from mow.config import Params, freeze
from mow.envs import SUCCESS_SUITES, action_spec, make_env
from mow.envs.vector import VectorEnv
from mow.policy import ContextWindow, Policy, random_actions
from mow.runs import MULTITASK_METHODS, RunSpec
from mow.runtime import Runtime, seeded, select_device
from mow.tracking import git_commit
from mow.train import build_models

RAW_FORMAT = 1
EVAL_SEED_OFFSET = 10_000  # evaluation envs never reuse a training seed


def load_model(path: Path | str, device: torch.device):
    """Rebuild the world model and actor-critic of a final model file (checksum verified)."""
    payload = checkpoint.load(path)
    params = Params(tree=freeze(payload["params"]), source=str(path))
    continuous = payload.get("continuous", False)  # model files of discrete-only versions lack it
    if payload["spec"]["method"] in MULTITASK_METHODS:
        from mow.train_mow import build_mow_models

        wm, ac = build_mow_models(params, payload["spec"]["suite"], payload["tasks"], payload["num_actions"],
                                  payload["clusters"], device, continuous)
    else:
        wm, ac = build_models(params, payload["num_actions"], device, continuous)
    wm.load_state_dict(payload["world_model"])
    ac.load_state_dict(payload["actor_critic"])
    wm.eval()
    ac.eval()
    return payload, params, wm, ac


def episode_quotas(episodes: int, envs: int) -> np.ndarray:
    envs = min(envs, episodes)
    quotas = np.full(envs, episodes // envs)
    quotas[: episodes % envs] += 1
    return quotas


def run_episodes(policy: Policy, envs: VectorEnv, quotas: np.ndarray, *, greedy: bool, seed: int,
                 act_context: int, runtime, legal: np.ndarray | None = None, success: bool = False) -> list[dict]:
    """Play each env's quota of episodes; `legal` (bool [num_actions]) limits the random
    first action of a multi-task agent to its task's actions. With `success` each episode
    also records whether the env's success flag was set at any of its steps, and envs
    with goals (Meta-World) record the episode's goal index."""
    n = envs.num_envs
    rng = np.random.default_rng(seed)
    num_actions, continuous = action_spec(envs.single_action_space)
    context = ContextWindow(n, act_context, envs.single_observation_space.shape, runtime.device,
                            num_actions if continuous else 0)
    obs = envs.reset(seed=seed)
    goals = [getattr(env, "goal", None) for env in envs.envs]  # goal of each env's running episode
    done = np.zeros(n, dtype=int)
    episodes: list[dict] = []
    while (done < quotas).any():
        obs_t = torch.from_numpy(obs).to(runtime.device)
        actions = policy(context, obs_t, greedy=greedy)
        if actions is None:
            actions = (random_actions(rng, n, num_actions, continuous) if legal is None
                       else rng.choice(np.flatnonzero(legal), size=n))
        else:
            actions = actions.cpu().numpy()
        out = envs.step(actions)
        context.push(obs_t, torch.from_numpy(np.asarray(actions)).to(runtime.device))
        obs = out.obs
        for (i, ret, length), ok in zip(out.finished, out.finished_success, strict=True):
            if done[i] < quotas[i]:
                episode = {"env": int(i), "return": float(ret), "length": int(length)}
                if success:
                    episode["success"] = bool(ok)
                if goals[i] is not None:
                    episode["goal"] = int(goals[i])
                episodes.append(episode)
                done[i] += 1
            goals[i] = getattr(envs.envs[i], "goal", None)  # auto-reset started the next episode
    return episodes


def evaluate(model_file: Path | str, *, out_path: Path | str, episodes: int | None = None,
             device: str | None = None, task: str | None = None, loaded=None) -> dict:
    """Evaluate a model file under the protocol it was trained for; write and return the raw record.

    A multi-task (MoW) model is evaluated on one of its tasks (`task`); pass `loaded`
    (from `load_model`) to evaluate several tasks without reloading.
    """
    model_file = Path(model_file)
    started = time.perf_counter()
    runtime = Runtime(select_device(device or "auto"), amp_dtype=None)
    payload, params, wm, ac = loaded or load_model(model_file, runtime.device)
    spec = RunSpec(**payload["spec"])
    multitask = spec.method in MULTITASK_METHODS
    if multitask:
        if task not in payload["tasks"]:
            raise ValueError(f"task: '{task}' is not one of the model's tasks ({', '.join(payload['tasks'])})")
        spec = dataclasses.replace(spec, task=task)
    protocol = dict(params.protocol(spec.protocol))
    n_episodes = episodes or protocol["eval_episodes"]
    quotas = episode_quotas(n_episodes, protocol["eval_envs"])
    seed = spec.seed + EVAL_SEED_OFFSET
    envs = VectorEnv([partial(make_env, spec.suite, spec.task, protocol, seed=seed + i, train=False,
                              full_action_space=multitask) for i in range(len(quotas))])
    if spec.suite == "metaworld":  # walk the MT50 goals: episode e plays goal e mod 50
        from mow.envs.metaworld import GOALS_PER_TASK

        first = np.concatenate([[0], np.cumsum(quotas)[:-1]])
        for env, start, quota in zip(envs.envs, first, quotas):
            env.set_goal_sequence([(start + j) % GOALS_PER_TASK for j in range(quota)])
    task_ids = None
    if multitask:
        task_ids = torch.full((len(quotas),), payload["tasks"].index(task), dtype=torch.long, device=runtime.device)
    policy = Policy(wm, ac, runtime, act_latent=params["train"]["act_latent"], task_ids=task_ids)
    reports_success = spec.suite in SUCCESS_SUITES
    try:
        # the policy samples from torch's generator: seeded, so an evaluation gives the same
        # returns in any process (its own job, or in-process after training or another task)
        with seeded(seed):
            eps = run_episodes(policy, envs, quotas, greedy=protocol["eval_policy"] == "greedy", seed=seed,
                               act_context=params["train"]["act_context"], runtime=runtime,
                               legal=(ac.action_masks[task_ids[0]].cpu().numpy()
                                      if multitask and ac.action_masks is not None else None),
                               success=reports_success)
    finally:
        envs.close()
    returns = [e["return"] for e in eps]
    record = {
        "format": RAW_FORMAT,
        "suite": spec.suite, "method": spec.method, "variant": spec.variant, "task": spec.task,
        "seed": spec.seed, "scale": spec.scale, "protocol": spec.protocol, "protocol_config": protocol,
        "policy": protocol["eval_policy"], "env_steps_trained": payload["env_steps"],
        "episodes": eps, "returns": returns, "lengths": [e["length"] for e in eps],
        "mean_return": float(np.mean(returns)), "std_return": float(np.std(returns)),
        **({"successes": [int(e["success"]) for e in eps],
            "success_rate": float(np.mean([e["success"] for e in eps]))} if reports_success else {}),
        "checkpoint": str(model_file), "checkpoint_sha256": checkpoint.file_sha256(model_file),
        "params_hash": payload["params_hash"], "mlflow_run_id": payload.get("mlflow_run_id"),
        "git_commit": git_commit(), "host": platform.node(), "device": str(runtime.device),
        "eval_seconds": round(time.perf_counter() - started, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    checkpoint.atomic_write_text(Path(out_path), json.dumps(record, indent=1) + "\n")
    return record


def read_raw(path: Path | str) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable raw result ({exc})") from None
    missing = [k for k in ("suite", "method", "task", "seed", "protocol", "returns", "scale") if k not in record]
    if missing:
        raise ValueError(f"{path}: raw result lacks {', '.join(missing)}")
    return record

