"""`mow bench-versions`: the same method's env-step updates in two or more versions of this
code, side by side in one run, to measure what a change did.

`mow bench` compares the methods within one version. A before/after of the code needs each
version's own models and update code, so each version runs from a copy of its files
(``git archive REV``; ``.`` is the working tree as it is) in a process of its own, with that
copy first on ``PYTHONPATH``; only the timing is this file's, the same for every version. It
follows `mow bench`: one warm-up round, untimed rounds until the process stops growing (two
in a row each faulting in under 1 % of its peak resident size, at most 10), then timed
rounds alternating between the versions, one process computing at a time, so that a load
change on a shared machine hits all alike.

A version reaches its parts through its own ``mow.bench``: ``_Setup`` from the commit that
introduced it, and before that (back to 021078a, the code before the performance work) the
closures that ``bench_models`` passed to its timer. A version whose sizes differ can be
given the others' with overrides: ``REV+model.mow.expert_layers=1+...``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

PARTS = ("wm_update", "imagine", "ac_update")
METHODS = ("storm", "mow")


def parse_version(text: str) -> tuple[str, list[str]]:
    """``REV+KEY=VALUE+KEY=VALUE`` -> (REV, overrides)."""
    rev, *overrides = text.split("+")
    if not rev:
        raise ValueError(f"version {text!r}: expected REV or REV+KEY=VALUE+..., e.g. HEAD~3")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"version {text!r}: override {bad[0]!r} is not KEY=VALUE")
    return rev, overrides


def export(repo: Path, rev: str, dest: Path) -> tuple[Path, str]:
    """The tracked files of ``rev`` under ``dest`` (``.``: ``repo`` itself, uncommitted
    changes included); returns the folder and the commit it holds."""
    if rev == ".":
        head = _git(repo, "rev-parse", "--short", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
        return repo, head + ("+changes" if dirty else "")
    try:
        commit = _git(repo, "rev-parse", "--short", "--verify", "--quiet", f"{rev}^{{commit}}")
    except ValueError:
        raise ValueError(f"version {rev!r}: not a commit of the repository at {repo}") from None
    archive = dest.with_suffix(".tar")
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit], stdout=f, check=True)
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    return dest, commit


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"git {' '.join(args)}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
    return done.stdout.strip()


# ---------------------------------------------------------------- worker (another version's code)

def _settling():
    """This checkout's `mow/settling.py`, loaded by path: in a worker ``mow`` is another
    version's package, which may predate it."""
    spec = importlib.util.spec_from_file_location("_mow_settling", Path(__file__).with_name("settling.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parts(root: Path, method: str, scale: str, overrides: list[str], threads: int):
    """The version's three timed parts, built by its own mow.bench at its fp32 settings on its
    own device choice, and the wait for that device (CUDA runs asynchronously)."""
    import torch

    torch.set_num_threads(threads)
    from mow.config import load_params
    from mow.runtime import Runtime, make_runtime
    import mow.bench as bench

    params = load_params(root / "params.yaml", scale=scale, overrides=overrides)
    base = make_runtime(params["train"])   # the version's own runtime set-up (allocator, threads)
    runtime = Runtime(base.device, None)
    sync = torch.cuda.synchronize if base.device.type == "cuda" else (lambda: None)
    if hasattr(bench, "_Setup"):
        setup = bench._Setup(params, runtime, None, method)
        return [setup.parts[name] for name in PARTS], sync
    closures = []   # before _Setup: bench_models timed each part through _time(fn, ...)
    bench._time = lambda fn, repeats, device: (closures.append(fn), 1.0)[1]
    bench.bench_models(params, runtime, 1, None, method=method)
    return closures, sync


def _worker(root: str, method: str, scale: str, threads: str, *overrides: str) -> None:
    """Answers one JSON line per request read from stdin: settle, record, quit. A version
    that cannot build its parts answers an error line (the traceback goes to stderr)."""
    try:
        fns, sync = _parts(Path(root), method, scale, list(overrides), int(threads))
    except Exception as exc:
        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return
    import mow

    settling = _settling()

    def one_round() -> tuple[list[float], int]:
        seconds, faults = [], settling.minor_page_faults()
        for fn in fns:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            seconds.append(time.perf_counter() - t0)
        return seconds, settling.minor_page_faults() - faults

    def answer(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    answer({"package": str(Path(mow.__file__).parent)})   # whose code runs: the version's
    for request in map(str.strip, sys.stdin):
        if request == "settle":
            one_round()   # the warm-up; then settle_rounds counts the rounds after it, as mow.bench does
            limit = settling.fault_limit(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            rounds, settled = settling.settle(lambda: one_round()[1], limit)
            answer({"settle_rounds": rounds, "settled": settled})
        elif request == "record":
            seconds, faults = one_round()
            answer({"seconds": seconds, "page_faults": faults})
        elif request == "quit":
            answer({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            return


# ---------------------------------------------------------------- orchestrator (this version)

class _Version:
    """One version's worker process for one method."""

    def __init__(self, label: str, root: Path, commit: str, overrides: list[str], method: str, scale: str,
                 threads: int):
        self.label, self.commit, self.overrides = label, commit, overrides
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(threads))
        # -P: this file's folder (mow/) must not shadow the version's package on sys.path
        self.proc = subprocess.Popen([sys.executable, "-P", __file__, "worker", str(root), method, scale,
                                      str(threads), *overrides],
                                     cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.samples: list[dict] = []
        started = self._read("start")
        if "error" in started:
            self.proc.wait()
            raise ValueError(f"bench-versions: version {label} could not build {method}: {started['error']}")
        self.package = started["package"]

    def _read(self, request: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"bench-versions: {self.label} died on '{request}' (exit code "
                               f"{self.proc.returncode}; its error is above)")
        return json.loads(line)

    def ask(self, request: str) -> dict:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._read(request)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def compare_versions(repo: Path, versions: list[str], *, scale: str = "paper", methods=METHODS,
                     repeats: int = 5, threads: int | None = None) -> dict:
    """Each of ``methods`` in every version: workers built one after another, settled, then
    ``repeats`` rounds alternating over the versions. Returns the JSON document."""
    import torch

    threads = threads or torch.get_num_threads()
    parsed = [parse_version(v) for v in versions]
    repo = Path(_git(repo, "rev-parse", "--show-toplevel"))
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
              "cpu": platform.processor() or platform.machine(), "threads": threads, "scale": scale,
              "repeats": repeats, "precision": "fp32", "runs": []}
    with tempfile.TemporaryDirectory(prefix="mow-bench-versions-") as tmp:
        roots = [export(repo, rev, Path(tmp) / f"v{i}") for i, (rev, _) in enumerate(parsed)]
        for method in methods:
            running: list[_Version] = []
            try:
                for text, (rev, overrides), (root, commit) in zip(versions, parsed, roots):
                    running.append(_Version(text, root, commit, overrides, method, scale, threads))
                settled = [v.ask("settle") for v in running]
                for r in range(repeats):
                    for v in running:
                        v.samples.append(v.ask("record"))
                    print(f"bench-versions: {method} round {r + 1}/{repeats}: "
                          + ", ".join(f"{v.label} {sum(v.samples[-1]['seconds']):.2f} s" for v in running), flush=True)
                for v, settle in zip(running, settled):
                    peak = v.ask("quit")
                    steps = [sum(s["seconds"]) for s in v.samples]
                    result["runs"].append({
                        "method": method, "version": v.label, "commit": v.commit, "overrides": v.overrides,
                        "package": v.package,
                        **settle, **peak,
                        "samples_s": {p: [round(s["seconds"][i], 4) for s in v.samples] for i, p in enumerate(PARTS)},
                        "page_faults": [s["page_faults"] for s in v.samples],
                        **{f"{p}_s": statistics.median(s["seconds"][i] for s in v.samples) for i, p in enumerate(PARTS)},
                        "train_step_s": statistics.median(steps)})
            finally:
                for v in running:
                    v.close()
    return result


def markdown_table(result: dict) -> str:
    """Medians per part, one column per method and version; the last row's speed-up is
    against the method's first version."""
    runs = result["runs"]
    head = "| per call | " + " | ".join(f"{r['method']} {r['version']}" for r in runs) + " |"
    lines = [head, "|---" * (len(runs) + 1) + "|"]
    for part in PARTS:
        lines.append(f"| {part} | " + " | ".join(f"{r[f'{part}_s']:.3f} s" for r in runs) + " |")
    first = {}
    cells = []
    for r in runs:
        base = first.setdefault(r["method"], r["train_step_s"])
        cells.append(f"{r['train_step_s']:.3f} s ({base / r['train_step_s']:.2f}x)")
    lines.append("| one env step's updates | " + " | ".join(cells) + " |")
    lines.append("| peak RSS | " + " | ".join(f"{r['peak_rss_mib'] / 1024:.1f} GiB" for r in runs) + " |")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _worker(*sys.argv[2:])
