"""Joint MoW training: one agent, every task of a suite (SPEC §1, DESIGN "Decisions").

The loop, checkpointing and resume are the STORM trainer's (`mow.train.Trainer`); this
subclass changes what it holds and how batches are formed:

- Envs: `train.num_envs` per task, all in one vector env with the full shared action set
  (18 ALE actions; Meta-World: the 4-D continuous action every task shares); env i plays
  task i // num_envs. Each task gets the same agent-step
  budget (`train.env_steps`), so `step` counts steps *per task*.
- Replay: one stream per env (the STORM buffer), so a task's sequences come from its own
  streams; `train.buffer_capacity` is per task.
- Batch mixing (decision): the rows of every world-model batch and every imagination batch
  cycle through the tasks (row r of update u plays task (u·B + r) mod K), so each task
  gets the same share of updates over any K consecutive rows; the stream inside a task is
  random. Each rank then orders its rows by (cluster, task) (`cluster_major`), so that
  the models select a cluster's rows as views. Updates run `update_ratio` times per env
  step summed over tasks, i.e. as many as K single-task STORMs would run, each on a
  task-mixed batch.
- Models: MoWWorldModel + MultiTaskActorCritic, clusters from `clusters.json`, initialised
  from the warm-up weights (every cluster VAE/head set starts from the shared one).
- Data parallel (`torchrun --nproc_per_node N -m mow train --method mow --set train.nproc_per_node=N`): every rank
  steps its own envs (distinct seeds) for env_steps / N agent steps per task and builds
  batches of size B / N; gradients and normaliser / BatchNorm statistics are averaged
  over ranks after every update, so the ranks hold identical weights and the global batch
  and update count equal the single-process run's. Gloo on CPU, NCCL on GPU. Each rank
  checkpoints its own envs and replay (`state.rank<r>.ckpt`); rank 0 tracks and writes
  the model.
"""

from __future__ import annotations

import io
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mow import checkpoint
from mow.config import ConfigError, Params
from mow.envs import SUCCESS_SUITES, make_env
from mow.envs.vector import VectorEnv
from mow.models.actor_critic import MultiTaskActorCritic
from mow.models.mow_world_model import MoWWorldModel
from mow.models.row_groups import read_back
from mow.runs import RunSpec, clusters_path, pretrain_path, state_path
from mow.runtime import seed_everything
from mow.train import Trainer
from mow.warmup import (action_masks, check_clusters_file, check_suite_tasks, expand_warmup_weights,
                        load_pretrained, random_legal_actions)


def build_mow_models(params: Params, suite: str, tasks, num_actions: int, assignment, device: torch.device,
                     continuous: bool = False):
    """MoW's world model and agent; `continuous`: `num_actions` is the Box(-1, 1) action's dimension."""
    wm = MoWWorldModel(params.mow_config(len(tasks)), num_actions, continuous)
    wm.set_clusters(list(assignment))
    masks = None if continuous else action_masks(suite, tasks, num_actions)
    ac = MultiTaskActorCritic(params.agent_config(), wm.state_dim, num_actions, masks, wm.cfg.num_clusters,
                              continuous=continuous, num_tasks=len(tasks))
    ac.set_clusters(list(assignment))
    return wm.to(device), ac.to(device)


def mixed_task_rows(update: int, size: int, num_tasks: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Tasks of the rows of update `update`'s batch held by `rank`: global row r plays task
    (update·size + r) mod K, and rank i holds the i-th contiguous slice of size/world rows."""
    local = size // world
    first = update * size + rank * local
    return (torch.arange(local) + first) % num_tasks


def cluster_major(tasks: torch.Tensor, cluster_of_task: torch.Tensor) -> torch.Tensor:
    """The same rows ordered by (cluster, task). Each cluster's and each task's rows are then
    contiguous, so the models select them as views instead of gathering copies
    (`mow.models.row_groups`). Row order means nothing in a batch: losses and metrics are
    per-task means, and BatchNorm statistics are per cluster VAE."""
    key = cluster_of_task[tasks] * len(cluster_of_task) + tasks
    return tasks[torch.argsort(key, stable=True)]


@torch.no_grad()
def per_task_imagination_metrics(ac: MultiTaskActorCritic, imagination, task_ids: torch.Tensor, tasks) -> dict:
    """Policy entropy, mean imagined reward and return scale of each task in an imagination
    batch. The batch-wide means hide a task whose actor collapses onto a wrong action
    while another task learns (seen on the sanity tasks with per-step random cues).
    Per-task means as sums over index_add, so that only the present tasks' list is read
    from the device (one synchronisation, not one per task)."""
    entropy = ac.policy(imagination.states[:, :-1].float(), task_ids).entropy().mean(1)
    rewards = imagination.rewards.float().mean(1)
    rows = torch.stack([torch.ones_like(entropy), entropy, rewards], dim=1)
    sums = rows.new_zeros(len(tasks), 3).index_add_(0, task_ids, rows)
    means = sums[:, 1:] / sums[:, :1].clamp(min=1.0)
    out = {}
    for task in torch.unique(read_back(task_ids)[0]).tolist():
        out[f"ac/entropy/{tasks[task]}"] = means[task, 0]
        out[f"imag/reward_mean/{tasks[task]}"] = means[task, 1]
        out[f"ac/scale/{tasks[task]}"] = ac.normalizers[task].scale()
    return out


def distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("MOW_DDP_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), world


def check_ranks(params: Params, world: int) -> None:
    """The ranks change what is computed (env seeds, per-rank budgets): the recorded
    parameters must say how many there are."""
    if params["train"]["nproc_per_node"] != world:
        raise ConfigError(f"train.nproc_per_node: {params['train']['nproc_per_node']} but launched with {world} "
                          f"rank(s); pass --set train.nproc_per_node={world}")


class MultiTaskTrainer(Trainer):
    def __init__(self, spec: RunSpec, params: Params, *, pretrained: Path | None = None, **kwargs):
        """`pretrained`: the warm-up model to start from (default: the run's own
        warmup/pretrain.ckpt; a variant sharing another's warm-up passes that one's)."""
        self.tasks = check_suite_tasks(params, spec.suite)
        self.num_tasks = len(self.tasks)
        self.rank, self.world = distributed()
        cfg = params["train"]
        check_ranks(params, self.world)
        for key in ("wm_batch", "imag_batch"):
            if cfg[key] % self.world:
                raise ConfigError(f"train.{key}: {cfg[key]} is not divisible by the {self.world} data-parallel ranks")
        if cfg["env_steps"] % self.world:
            raise ConfigError(f"train.env_steps: {cfg['env_steps']} is not divisible by the {self.world} ranks")
        run_dir = spec.run_dir(kwargs.get("runs_root", "runs"))
        self.pretrained = Path(pretrained) if pretrained is not None else pretrain_path(run_dir)
        self.clusters = check_clusters_file(clusters_path(run_dir), self.tasks, params)
        self.cluster_of_task = torch.as_tensor(self.clusters.labels)  # host copy: orders every batch
        if self.rank:
            kwargs["track"], kwargs["progress"] = False, False
        super().__init__(spec, params, **kwargs)
        if self.world > 1:  # per-rank budgets; the update count stays the single-process one
            w = self.world
            self.cfg = {**self.cfg, "env_steps": cfg["env_steps"] // w, "warmup_steps": cfg["warmup_steps"] // w,
                        "update_ratio": cfg["update_ratio"] * w}
        device = self.runtime.device
        self.task_of_env = torch.arange(self.num_tasks).repeat_interleave(self.envs_per_task)
        self.policy.task_ids = self.task_of_env.to(device)
        self.masks = None if self.continuous else self.ac.action_masks.cpu().numpy()
        if self.rank:  # same initial weights (seeded above, broadcast later); own envs and exploration
            seed_everything(spec.seed + 7919 * self.rank)
            self.action_rng = np.random.default_rng(spec.seed + 7919 * self.rank)
            self.obs = self.envs.reset(seed=spec.seed * 1000 + 7919 * self.rank)
            self.replay.generator.manual_seed(spec.seed + 7919 * self.rank)

    # -- construction hooks ---------------------------------------------------------------
    def _make_envs(self) -> VectorEnv:
        n, seed = self.envs_per_task, self.spec.seed
        base = seed * 100_000 + 10_000 * self.rank
        fns = [partial(make_env, self.spec.suite, task, self.protocol, seed=base + 100 * k + i, train=True,
                       full_action_space=True)
               for k, task in enumerate(self.tasks) for i in range(n)]
        return VectorEnv(fns)

    def _build_models(self, device: torch.device):
        return build_mow_models(self.params, self.spec.suite, self.tasks, self.num_actions, self.clusters.labels, device,
                                self.continuous)

    def _initialise(self) -> None:
        """Fresh start: warm-up weights into every cluster, identical weights on every rank."""
        warm = load_pretrained(self.pretrained, self.params, self.tasks)
        self.wm.load_state_dict(expand_warmup_weights(warm["model"], self.wm))
        self.wm.set_clusters(list(self.clusters.labels))
        if self.world > 1:
            for tensor in list(self.wm.state_dict().values()) + list(self.ac.state_dict().values()):
                dist.broadcast(tensor, src=0)

    def _load_state(self):
        """Ranks save one after another, so a kill can leave them one checkpoint apart: every
        rank resumes from the newest step all of them hold (a newer rank takes its `.prev`)."""
        found = super()._load_state()
        if self.world == 1:
            return found
        step = torch.tensor([found[0]["step"] if found else -1], dtype=torch.long, device=self.runtime.device)
        common = step.clone()
        dist.all_reduce(common, op=dist.ReduceOp.MIN)
        if int(common) == int(step):
            return found
        if int(common) < 0:  # a rank has no checkpoint at all: every rank starts over
            return None
        previous = checkpoint.previous_path(self._state_file())
        state = checkpoint.load(previous) if previous.is_file() else None
        if state is None or state["step"] != int(common):
            raise checkpoint.CheckpointError(
                f"{self._state_file()}: rank {self.rank} holds env step {int(step)} but another rank's newest "
                f"checkpoint is step {int(common)}, and {previous.name} is not that step; delete the run's "
                "checkpoints/ to start over")
        return state, previous

    def _random_actions(self) -> np.ndarray:
        return random_legal_actions(self.action_rng, self.masks, self.task_of_env.numpy(), self.num_actions)

    def _env_task(self, env: int) -> str:
        return self.tasks[env // self.envs_per_task]

    # -- checkpoint per rank ----------------------------------------------------------------
    def _state_file(self) -> Path:
        path = state_path(self.run_dir)
        return path if self.rank == 0 else path.with_name(f"state.rank{self.rank}.ckpt")

    # -- batches -----------------------------------------------------------------------------
    def _task_rows(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task and replay stream of each row of this rank's share of a `size`-row batch."""
        tasks = cluster_major(mixed_task_rows(self.updates, size, self.num_tasks, self.rank, self.world),
                              self.cluster_of_task)
        within = torch.randint(0, self.envs_per_task, (len(tasks),), generator=self.replay.generator)
        return tasks, tasks * self.envs_per_task + within


    def _wm_loss(self):
        tasks, streams = self._task_rows(self.cfg["wm_batch"])
        batch = self.replay.sample(len(tasks), self.cfg["wm_seq_len"], streams)
        self.wm.set_update(self.updates)
        with self.runtime.autocast():
            loss, metrics = self.wm_loss(batch.obs, batch.actions, batch.rewards, batch.terminations,
                                         tasks.to(self.runtime.device))
        return loss, self._named(metrics)

    def _ac_loss(self):
        tasks, streams = self._task_rows(self.cfg["imag_batch"])
        ctx = self.replay.sample(len(tasks), self.cfg["imag_context"], streams)
        task_ids = tasks.to(self.runtime.device)
        with self.runtime.autocast():
            imagination = self.wm.imagine(lambda s: self.ac.act(s, task_ids), ctx.obs, ctx.actions, task_ids,
                                          self.cfg["imag_horizon"])
            loss, metrics = self.ac.compute_loss(imagination, task_ids)
        metrics.update(per_task_imagination_metrics(self.ac, imagination, task_ids, self.tasks))
        return loss, metrics, imagination

    def _named(self, metrics: dict) -> dict:
        """`wm/rec/task3` -> `wm/rec/<task name>` (MLflow and metrics.jsonl read by name)."""
        out = {}
        for key, value in metrics.items():
            head, _, last = key.rpartition("/")
            if last.startswith("task") and last[4:].isdigit():
                key = f"{head}/{self.tasks[int(last[4:])]}"
            out[key] = value
        return out

    def _sync_gradients(self, parameters) -> None:
        if self.world == 1:
            return
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    def update_actor_critic(self) -> None:
        super().update_actor_critic()
        self._sync_buffers()

    def _sync_buffers(self) -> None:
        """Average BatchNorm statistics and return normalisers so every rank stays identical."""
        if self.world == 1:
            return
        for module in (self.wm, self.ac):
            for buf in module.buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(self.world)

    # -- logging and outputs -------------------------------------------------------------------
    def _episode_scalars(self, episodes):
        out = {"episode/count": len(episodes)}
        for k, task in enumerate(self.tasks):
            mine = [e for e in episodes if e[0] // self.envs_per_task == k]
            if mine:
                out[f"episode/return/{task}"] = float(np.mean([e[1] for e in mine]))
                if self.spec.suite in SUCCESS_SUITES:
                    out[f"episode/success/{task}"] = float(np.mean([e[3] for e in mine]))
        return out

    def _metrics_dir(self) -> Path:
        return self.run_dir if self.rank == 0 else self.run_dir / f"rank{self.rank}"

    def _write_model(self) -> None:
        if self.rank == 0:
            super()._write_model()

    def _model_extra(self) -> dict:
        return {"tasks": list(self.tasks), "clusters": self.clusters.labels.tolist()}

    def run(self) -> Path:
        out = super().run()
        if self.rank == 0:
            self._write_routing()
            self._write_imagination()
        if self.world > 1:
            dist.barrier()
        return out

    def _write_routing(self) -> None:
        with torch.no_grad():
            routing = self.wm.routing()
        doc = {"tasks": list(self.tasks), "num_experts": self.wm.cfg.num_experts,
               "temperature": float(self.wm.router.current_temperature),
               "weights": routing.dense.cpu().tolist(), "indices": routing.indices.cpu().tolist(),
               "clusters": self.clusters.labels.tolist()}
        checkpoint.atomic_write_text(self.run_dir / "routing.json", json.dumps(doc, indent=1) + "\n")

    @torch.no_grad()
    def _write_imagination(self) -> None:
        """Real vs imagined frames per task: the imagined rollout starts from the real
        context and follows the real actions, so the two rows are directly comparable."""
        context, horizon = self.cfg["imag_context"], self.cfg["imag_horizon"]
        length = context + horizon
        if not self.replay.can_sample(length):
            return
        tasks = torch.arange(self.num_tasks)
        streams = tasks * self.envs_per_task
        generator_state = self.replay.generator.get_state()  # keep the training stream untouched
        batch = self.replay.sample(self.num_tasks, length, streams)
        self.replay.generator.set_state(generator_state)
        device = self.runtime.device
        task_ids = tasks.to(device)
        real_actions = batch.actions[:, context:]
        step = {"i": 0}

        def follow_real(_state):
            a = real_actions[:, step["i"]]
            step["i"] += 1
            return a

        with self.runtime.autocast():
            imag = self.wm.imagine(follow_real, batch.obs[:, :context], batch.actions[:, :context], task_ids, horizon)
        latent = self.wm.cfg.world.latent_dim
        frames = []
        embedding = self.wm.task_embedding(task_ids)
        for k in range(self.num_tasks):
            vae = self.wm.vaes[int(self.wm.cluster_of_task[k])]
            z = imag.states[k, 1:, :latent]
            cond = embedding[k:k + 1].expand(z.shape[0], -1)
            with self.runtime.autocast():
                image = vae.decode(z, cond).float()  # [T, C, H, W] in the [0, 1] target scale
            frames.append(image.permute(0, 2, 3, 1))
        imagined = (torch.stack(frames).clamp(0, 1) * 255).round().to(torch.uint8)

        buf = io.BytesIO()
        np.savez_compressed(buf, real=batch.obs[:, context:].cpu().numpy(), imagined=imagined.cpu().numpy(),
                            tasks=np.array(self.tasks))
        checkpoint.atomic_write_bytes(self.run_dir / "imagination.npz", buf.getvalue())
