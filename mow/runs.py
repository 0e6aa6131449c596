"""What a run is and where its files live: one place for every path the pipeline uses.

    runs/<scale>/<suite>/<protocol>/<method>/<variant>/<task>/seed<k>/
        checkpoints/state.ckpt(.prev)   full resumable state (models, optimisers, replay, RNG, envs)
        model.ckpt                       final weights + the resolved configuration
        config.yaml                      the resolved parameters of the run
        metrics.jsonl                    every logged metric (the raw learning curve)
    results/raw/<scale>/<suite>/<protocol>/<method>/<variant>/<task>/seed<k>.json
                                         per-episode evaluation returns (the raw result)

The scale is the top folder so smoke and paper outputs can never be mixed up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METHODS = ("storm",)


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
