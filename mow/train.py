"""The STORM training loop: act, store, one world-model update and one imagination
actor-critic update per env step (the ratio is `train.update_ratio`), checkpoint, resume.

Rerunning the same command continues a killed run from its last complete checkpoint
(models, optimisers, replay, envs, RNG streams, step, MLflow run), and on CPU ends with
exactly the weights an uninterrupted run would have.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from mow import checkpoint
from mow.config import Params
from mow.envs import SUCCESS_SUITES, action_spec, make_env
from mow.envs.vector import VectorEnv
from mow.models.actor_critic import ActorCritic, NonFiniteOutput
from mow.models.world_model import WorldModel
from mow.policy import ContextWindow, Policy, random_actions
from mow.replay import ReplayBuffer
from mow.runs import RunSpec, model_path, state_path
from mow.runtime import adam, make_runtime, rng_state, seed_everything, set_rng_state
from mow.tracking import Tracker, flatten

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf; the message names the step and the loss."""


def build_models(params: Params, num_actions: int, device: torch.device,
                 continuous: bool = False) -> tuple[WorldModel, ActorCritic]:
    """STORM's models; `continuous`: `num_actions` is the dimension of a Box(-1, 1) action."""
    wm = WorldModel(params.world_model_config(), num_actions, continuous).to(device)
    ac = ActorCritic(params.agent_config(), wm.state_dim, num_actions, continuous).to(device)
    return wm, ac


def config_mismatch(saved: dict, current: dict) -> str:
    """The first differing keys between two resolved parameter trees, for error messages."""
    a, b = flatten(saved), flatten(current)
    diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = ", ".join(f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in diffs[:3])
    return shown + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")


class MetricAccumulator:
    """Sums detached metric tensors on the device; one host sync per log interval."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def nonfinite(self) -> list[str]:
        """Names whose accumulated value is NaN or Inf (one host sync; a NaN stays NaN in a sum)."""
        if not self.sums:
            return []
        keys = list(self.sums)
        finite = torch.isfinite(torch.stack([self.sums[k] for k in keys])).cpu().tolist()
        return [k for k, ok in zip(keys, finite) if not ok]

    def pop(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).cpu().tolist()
        out = {k: v / self.counts[k] for k, v in zip(keys, values)}
        self.sums.clear()
        self.counts.clear()
        return out


class Trainer:
    def __init__(self, spec: RunSpec, params: Params, *, runs_root: Path | str = "runs", track: bool = True,
                 progress: bool = True, log=print):
        self.spec, self.params, self.log = spec, params, log
        self.cfg = params["train"]
        self.protocol = params.protocol(spec.protocol)
        self.run_dir = spec.run_dir(runs_root)
        self.progress = progress
        self.track = track
        self.runtime = make_runtime(self.cfg)
        device = self.runtime.device

        seed_everything(spec.seed)
        self.envs_per_task = self.cfg["num_envs"]
        self.envs = self._make_envs()
        self.num_actions, self.continuous = action_spec(self.envs.single_action_space)
        action_dim = self.num_actions if self.continuous else 0
        self.wm, self.ac = self._build_models(device)
        self.wm_loss = self.runtime.world_model_loss(self.wm, self.log)
        self.wm_opt = adam(self.wm.parameters(), lr=self.cfg["wm_lr"], eps=self.cfg["wm_eps"])
        self.ac_opt = adam([p for p in self.ac.parameters() if p.requires_grad],
                           lr=self.cfg["ac_lr"], eps=self.cfg["ac_eps"])
        obs_shape = self.envs.single_observation_space.shape
        n = self.envs.num_envs
        self.replay = ReplayBuffer(self.cfg["buffer_capacity"] * self.num_tasks, n, obs_shape, device=device,
                                   seed=spec.seed, action_dim=action_dim)
        self.context = ContextWindow(n, self.cfg["act_context"], obs_shape, device, action_dim)
        self.policy = self._make_policy()
        self.action_rng = np.random.default_rng(spec.seed)
        self.step = 0  # agent steps per task (every task advances together)
        self.update_credit = 0.0
        self.updates = 0
        self.obs = self.envs.reset(seed=spec.seed * 1000)
        self.mlflow_run_id: str | None = None
        self.metrics = MetricAccumulator()
        self.saved_step: int | None = None  # env step of the newest complete checkpoint

    # -- what differs between the single-task and the multi-task agent ------------------
    num_tasks = 1

    def _make_envs(self) -> VectorEnv:
        env_fn = partial(make_env, self.spec.suite, self.spec.task, self.protocol, train=True)
        return VectorEnv([partial(env_fn, seed=self.spec.seed * 1000 + i) for i in range(self.envs_per_task)])

    def _build_models(self, device: torch.device):
        return build_models(self.params, self.num_actions, device, self.continuous)

    def _make_policy(self) -> Policy:
        return Policy(self.wm, self.ac, self.runtime, act_latent=self.cfg["act_latent"])

    def _initialise(self) -> None:
        """Called once when a run starts from scratch (not on resume)."""

    def _random_actions(self) -> np.ndarray:
        return random_actions(self.action_rng, self.envs.num_envs, self.num_actions, self.continuous)

    def _env_task(self, env: int) -> str:
        """The task env `env` of the vector env plays."""
        return self.spec.task

    def _wm_loss(self) -> tuple[torch.Tensor, dict]:
        batch = self.replay.sample(self.cfg["wm_batch"], self.cfg["wm_seq_len"])
        with self.runtime.autocast():
            return self.wm_loss(batch.obs, batch.actions, batch.rewards, batch.terminations)

    def _ac_loss(self):
        ctx = self.replay.sample(self.cfg["imag_batch"], self.cfg["imag_context"])
        with self.runtime.autocast():
            imagination = self.wm.imagine(lambda s: self.ac.act(s), ctx.obs, ctx.actions, self.cfg["imag_horizon"])
            loss, metrics = self.ac.compute_loss(imagination)
        return loss, metrics, imagination

    def _episode_scalars(self, episodes: list[tuple[int, float, int, bool]]) -> dict[str, float]:
        """(env, return, length, success flag set at any step) of the episodes since the last log."""
        out = {"episode/return": float(np.mean([e[1] for e in episodes])),
               "episode/length": float(np.mean([e[2] for e in episodes])),
               "episode/count": len(episodes)}
        if self.spec.suite in SUCCESS_SUITES:
            out["episode/success"] = float(np.mean([e[3] for e in episodes]))
        return out

    def _model_extra(self) -> dict:
        return {}

    def _metrics_dir(self) -> Path:
        return self.run_dir

    # -- checkpoint ------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "spec": asdict(self.spec), "params": self.params.to_dict(),
            "params_hash": self.params.digest(), "step": self.step, "updates": self.updates,
            "update_credit": self.update_credit, "world_model": self.wm.state_dict(),
            "actor_critic": self.ac.state_dict(), "wm_opt": self.wm_opt.state_dict(), "ac_opt": self.ac_opt.state_dict(),
            "replay": self.replay.state_dict(), "context": self.context.state_dict(), "envs": self.envs.get_state(),
            "obs": self.obs, "rng": rng_state(), "action_rng": self.action_rng.bit_generator.state,
            "mlflow_run_id": self.mlflow_run_id, "action_space": str(self.envs.single_action_space),
        }

    def _state_file(self) -> Path:
        return state_path(self.run_dir)

    def save(self) -> None:
        # never let weights a NaN/Inf loss already reached replace the last good checkpoint
        self._check_finite(self.metrics.nonfinite())
        checkpoint.save(self._state_file(), self._state())
        self.saved_step = self.step

    def _load_state(self) -> tuple[dict, Path] | None:
        """The state to resume from: the newest intact checkpoint (or its `.prev`), or None."""
        return checkpoint.load_latest(self._state_file(), warn=self.log)

    def restore(self) -> bool:
        found = self._load_state()
        if found is None:
            return False
        state, path = found
        if state.get("format") != CHECKPOINT_FORMAT:
            raise checkpoint.CheckpointError(f"{path}: checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}")
        ours = {**asdict(self.spec), "action space": str(self.envs.single_action_space)}
        theirs = {**state["spec"], "action space": state.get("action_space", ours["action space"])}
        if theirs != ours:
            diffs = ", ".join(f"{k} {theirs.get(k)} -> {v}" for k, v in ours.items() if theirs.get(k) != v)
            raise checkpoint.CheckpointError(f"{path}: written for another run ({diffs}); "
                                             f"use the run's own folder or delete the checkpoint")
        if state["params_hash"] != self.params.digest():  # device/threads may differ
            raise checkpoint.CheckpointError(
                f"{path}: written with a different configuration ({config_mismatch(state['params'], self.params.to_dict())}); "
                f"use another run folder or restore the parameters")
        for name, module in (("world_model", self.wm), ("actor_critic", self.ac)):
            try:
                module.load_state_dict(state[name])
            except RuntimeError as exc:  # torch lists every tensor on many lines: keep the first
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                raise checkpoint.CheckpointError(f"{path}: {name} does not fit this model "
                                                 f"({lines[min(1, len(lines) - 1)]})") from None
        self.wm_opt.load_state_dict(state["wm_opt"])
        self.ac_opt.load_state_dict(state["ac_opt"])
        self.replay.load_state_dict(state["replay"])
        self.context.load_state_dict(state["context"])
        self.envs.set_state(state["envs"])
        self.obs = state["obs"]
        set_rng_state(state["rng"])
        self.action_rng.bit_generator.state = state["action_rng"]
        self.step, self.updates, self.update_credit = state["step"], state["updates"], state["update_credit"]
        self.mlflow_run_id = state["mlflow_run_id"]
        self.saved_step = self.step
        self.log(f"resumed {self.spec.name} from {path} at env step {self.step}")
        return True

    # -- updates -----------------------------------------------------------------------
    def update_world_model(self) -> None:
        self.wm.train()
        loss, metrics = self._wm_loss()
        self.wm_opt.zero_grad(set_to_none=True)
        loss.backward()
        self._sync_gradients(self.wm.parameters())
        metrics["wm/grad_norm"] = self._clip(self.wm.parameters(), self.cfg["wm_clip"], metrics, "wm")
        self.wm_opt.step()
        self.metrics.add(metrics)

    def update_actor_critic(self) -> None:
        try:
            loss, metrics, imagination = self._ac_loss()
        except NonFiniteOutput as exc:  # the imagined rollout samples from the actor
            self._check_finite([f"imag/{exc.what}"], self._weight_hint(self.ac))
            raise
        trainable = [p for p in self.ac.parameters() if p.requires_grad]
        self.ac_opt.zero_grad(set_to_none=True)
        loss.backward()
        self._sync_gradients(trainable)
        metrics["ac/grad_norm"] = self._clip(trainable, self.cfg["ac_clip"], metrics, "ac")
        self.ac_opt.step()
        self.ac.update_slow_critic()
        metrics["imag/reward_mean"] = imagination.rewards.float().mean()
        metrics["imag/termination_rate"] = imagination.terminations.float().mean()
        self.metrics.add(metrics)

    def _clip(self, parameters, max_norm: float, metrics: dict, prefix: str) -> torch.Tensor:
        """Clip gradients, refusing a NaN/Inf norm before the optimiser step: stepping would
        poison every weight, and the next imagination would fail far from the cause. A NaN
        or Inf loss always gives such a norm. One host sync per update (the check itself)."""
        try:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm, error_if_nonfinite=True)
        except RuntimeError:
            bad = [k for k, v in metrics.items() if not bool(torch.isfinite(torch.as_tensor(v).detach()).all())]
            self._check_finite(bad or [f"{prefix}/grad_norm"])
            raise

    def _sync_gradients(self, parameters) -> None:
        """Data-parallel hook (multi-task trainer under torchrun); one process: nothing to do."""

    # -- main loop ---------------------------------------------------------------------
    def act(self, obs_t: torch.Tensor) -> np.ndarray:
        actions = None
        if self.step >= self.cfg["warmup_steps"]:
            try:
                actions = self.policy(self.context, obs_t, greedy=False)
            except NonFiniteOutput as exc:
                self._check_finite(sorted({f"{exc.what}/{self._env_task(i)}" for i in exc.rows}),
                                   self._weight_hint(self.ac))
                raise
        if actions is None:
            return self._random_actions()
        return actions.cpu().numpy()

    def run(self) -> Path:
        resumed = self.restore()
        if not resumed:
            self._initialise()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_dir().mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.params.to_dict(), sort_keys=False))
        self.tracker = Tracker(self._metrics_dir(), suite=self.spec.suite, method=self.spec.method, variant=self.spec.variant,
                               task=self.spec.task, seed=self.spec.seed, protocol=self.spec.protocol, scale=self.spec.scale,
                               params_tree=self.params.to_dict(), params_hash=self.params.digest(),
                               resume_run_id=self.mlflow_run_id, enabled=self.track)
        self.mlflow_run_id = self.tracker.run_id
        if resumed:
            self.tracker.truncate_after(self.step)
        try:
            start = self.step
            self._loop()
            # a rerun of a finished run rewrites nothing (at paper scale the state is GBs)
            if self.step > start or not resumed or not model_path(self.run_dir).exists():
                self.save()
                self._write_model()
            out = model_path(self.run_dir)
        except BaseException:
            self.tracker.finish("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
            raise
        finally:
            self.envs.close()
        return out

    def _loop(self) -> None:
        cfg, n = self.cfg, self.envs_per_task
        total = cfg["env_steps"]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, unit="step", desc=self.spec.name, dynamic_ncols=True,
                       mininterval=1.0, file=sys.stderr)
        last_log_step, last_time, last_updates = self.step, time.perf_counter(), self.updates
        episode_log: list[tuple[int, float, int, bool]] = []
        last_return = float("nan")
        while self.step < total:
            obs_t = torch.from_numpy(self.obs).to(self.runtime.device)
            actions = self.act(obs_t)
            out = self.envs.step(actions)
            self._check_rewards(out.reward)
            terminal = out.terminated | (out.life_loss if self.protocol.get("life_loss_termination") else False)
            self.replay.add(self.obs, actions, out.reward, terminal)
            self.context.push(obs_t, torch.from_numpy(np.asarray(actions)).to(self.runtime.device))
            self.obs = out.obs
            self.step += n
            for (env, ret, length), success in zip(out.finished, out.finished_success, strict=True):
                episode_log.append((env, ret, length, success))
                last_return = ret

            if self.step > cfg["warmup_steps"] and self.replay.can_sample(max(cfg["wm_seq_len"], cfg["imag_context"])):
                # updates per env step summed over tasks: K tasks get K times STORM's updates
                self.update_credit += n * self.num_tasks * cfg["update_ratio"]
                while self.update_credit >= 1.0:
                    self.update_credit -= 1.0
                    self.update_world_model()
                    self.update_actor_critic()
                    self.updates += 1

            if bar is not None:
                bar.update(n)
            if self.step - last_log_step >= cfg["log_every"] or self.step >= total:
                now = time.perf_counter()
                self._check_finite(self.metrics.nonfinite())
                scalars = self.metrics.pop()
                scalars["perf/env_steps_per_s"] = (self.step - last_log_step) / max(now - last_time, 1e-9)
                scalars["perf/updates_per_s"] = (self.updates - last_updates) / max(now - last_time, 1e-9)
                scalars["replay/size"] = len(self.replay)
                if self.runtime.device.type == "cuda":
                    scalars["perf/gpu_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
                if episode_log:
                    scalars.update(self._episode_scalars(episode_log))
                    episode_log.clear()
                self.tracker.log(scalars, self.step)
                self.tracker.flush()
                if bar is not None:
                    bar.set_postfix(upd_s=f"{scalars['perf/updates_per_s']:.1f}", ret=f"{last_return:.1f}", refresh=False)
                last_log_step, last_time, last_updates = self.step, now, self.updates
            if self.step % cfg["checkpoint_every"] < n and self.step < total:
                self.save()
        if bar is not None:
            bar.close()

    def _check_rewards(self, rewards: np.ndarray) -> None:
        """A NaN/Inf reward from an env would enter the replay and only fail later, far from
        the cause (inside the symlog two-hot encoding of the reward loss): stop at the env
        step that returned it. Host-side numpy over num_envs values: no device sync."""
        if np.isfinite(rewards).all():
            return
        bad = np.flatnonzero(~np.isfinite(rewards))
        self._check_finite(sorted({f"env/reward/{self._env_task(i)}" for i in bad}),
                           f" returned by the environment ({', '.join(f'env {i}: {rewards[i]}' for i in bad)})",
                           step=self.step + self.envs_per_task)

    @staticmethod
    def _weight_hint(module: torch.nn.Module) -> str:
        """Where a diverged module's weights went (computed only once training has failed)."""
        stats = [(float(p.detach().abs().max()), n) for n, p in module.named_parameters() if p.numel()]
        nan = [n for v, n in stats if v != v]
        if nan:
            return f" (NaN weights in {', '.join(nan[:3])})"
        top, name = max(stats)
        return f" (largest weight |{name}| = {top:.3g}: is a learning rate too high?)"

    def _check_finite(self, bad: list[str], detail: str = "", step: int | None = None) -> None:
        """Stop on NaN/Inf metrics (checked at every log and before every checkpoint), naming
        the step, the task(s) and the losses; the newest checkpoint predates them. `detail`
        follows the names; `step` is the env step the fault belongs to (default: now)."""
        if not bad:
            return
        tasks = getattr(self, "tasks", (self.spec.task,))
        named = [t for t in tasks if any(k.endswith(f"/{t}") for k in bad)]
        where = f"task {', '.join(named)}" if named else (f"task {tasks[0]}" if len(tasks) == 1 else
                                                          f"a batch mixing tasks {', '.join(tasks)}")
        kept = (f"last good checkpoint {self._state_file()} (env step {self.saved_step}) is kept"
                if self.saved_step is not None else "no checkpoint was written")
        raise TrainingDiverged(f"{self.spec.name}: training diverged at env step {self.step if step is None else step} "
                               f"({where}): non-finite {', '.join(sorted(bad))}{detail}; {kept}")

    def _write_model(self) -> None:
        checkpoint.save(model_path(self.run_dir), {
            "format": CHECKPOINT_FORMAT, "spec": asdict(self.spec), "params": self.params.to_dict(),
            "params_hash": self.params.digest(), "num_actions": self.num_actions, "continuous": self.continuous,
            "env_steps": self.step,
            "world_model": self.wm.state_dict(), "actor_critic": self.ac.state_dict(),
            "mlflow_run_id": self.mlflow_run_id, **self._model_extra(),
        }, keep_previous=False)
