"""What a run is and where its files live: one place for every path the pipeline uses.

    runs/<scale>/<suite>/<protocol>/<method>/<variant>/<task>/seed<k>/
        checkpoints/state.ckpt(.prev)   full resumable state (models, optimisers, replay, RNG, envs)
        model.ckpt                       final weights + the resolved configuration
        config.yaml                      the resolved parameters of the run
        metrics.jsonl                    every logged metric (the raw learning curve)
    results/raw/<scale>/<suite>/<protocol>/<method>/<variant>/<task>/seed<k>.json
                                         per-episode evaluation returns (the raw result)

MoW trains one agent on every task of a suite: its run folder uses the task name `all`
(`.../mow/<variant>/all/seed<k>/`) and additionally holds
        warmup/pretrain.ckpt             warm-up weights (one shared VAE + head set)
        warmup/clusters.json             task clusters (fixed for the whole run)
        routing.json, imagination.npz    final routing weights and imagined rollouts (figures)
and its evaluation writes one raw file per task. The fixed random-policy warm-up data is
shared by every variant: runs/<scale>/<suite>/<protocol>/warmup_data/seed<k>/replay.ckpt.

The scale is the top folder so smoke and paper outputs can never be mixed up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METHODS = ("storm", "mow")
MULTITASK_METHODS = ("mow",)
JOINT_TASK = "all"  # the task folder of a run that trains every task of its suite


@dataclass(frozen=True)
class RunSpec:
    suite: str
    method: str
    variant: str
    task: str
    seed: int
    protocol: str
    scale: str

    @property
    def name(self) -> str:
        return f"{self.method}/{self.task}/seed{self.seed}"

    def _parts(self) -> tuple[str, ...]:
        return (self.scale, self.suite, self.protocol, self.method, self.variant, self.task)

    def run_dir(self, root: Path | str = "runs") -> Path:
        return Path(root).joinpath(*self._parts(), f"seed{self.seed}")

    def raw_result(self, root: Path | str = "results/raw") -> Path:
        return Path(root).joinpath(*self._parts(), f"seed{self.seed}.json")


def state_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "state.ckpt"


def model_path(run_dir: Path) -> Path:
    return Path(run_dir) / "model.ckpt"


def warmup_data_path(root: Path | str, scale: str, suite: str, protocol: str, seed: int) -> Path:
    return Path(root) / scale / suite / protocol / "warmup_data" / f"seed{seed}" / "replay.ckpt"


def pretrain_path(run_dir: Path) -> Path:
    return Path(run_dir) / "warmup" / "pretrain.ckpt"


def clusters_path(run_dir: Path) -> Path:
    return Path(run_dir) / "warmup" / "clusters.json"
