"""`mow bench --profile`'s summaries (mow/profiling.py) against hand-counted workloads: the
phases found, operator calls, gradients counted, kernels attributed to phases and host
syncs located. Times are only checked for consistency (a phase lies inside its call)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import mow
from mow.profiling import (kernels_in, median_phase_times, params_with_grad, phase, phases_by_call, profile_call,
                           sync_sites)

torch.set_num_threads(2)


def test_profile_call_reports_phases_operator_calls_and_touched_parameters():
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(8, 4), torch.nn.Linear(5, 3)
    x = torch.randn(6, 8)

    def update():
        used.zero_grad(set_to_none=True)
        with phase("loss"):
            loss = used(x).square().mean()
        with phase("backward"):
            loss.backward()
        with phase("extra"):
            for _ in range(3):
                torch.mm(x, x.t())
        with phase("extra"):  # a phase entered twice: one entry, both spans
            torch.mm(x, x.t())

    update()
    profile = profile_call(update, torch.device("cpu"), calls=3)
    assert profile["calls"] == 3 and set(profile["phases_s"]) == {"loss", "backward", "extra"}
    assert all(0 < t <= profile["wall_s"] for t in profile["phases_s"].values())  # medians of parts of each call
    calls = {op["name"]: op["calls"] for op in profile["top_ops"]}
    assert calls["aten::mm"] == 4 + 1  # per call: the phases' four, and the weight gradient's product
    selfs = [op["self_cpu_s"] for op in profile["top_ops"]]
    assert selfs == sorted(selfs, reverse=True) and len(selfs) <= 12
    assert "device" not in profile and "host_syncs" not in profile  # CUDA only
    assert params_with_grad(used, unused) == 8 * 4 + 4  # the unused layer has no gradient


def test_phase_times_are_per_call_sums_and_their_median():
    calls = [(0.0, 100.0), (100.0, 300.0), (300.0, 400.0)]  # µs
    marked = [("p", 10.0, 20.0), ("p", 30.0, 35.0), ("q", 50.0, 90.0),  # call 1: p twice (15 µs)
              ("p", 110.0, 290.0),                                      # call 2: a slow p, no q
              ("p", 310.0, 330.0), ("q", 340.0, 350.0)]                 # call 3
    per_call = phases_by_call(calls, marked)
    assert per_call[0] == {"p": [(10.0, 20.0), (30.0, 35.0)], "q": [(50.0, 90.0)]} and per_call[1] == {"p": [(110.0, 290.0)]}
    assert median_phase_times(per_call) == {"p": 20e-6, "q": 10e-6}  # p: 15, 180, 20; q: 40, 0, 10


def test_kernels_are_attributed_to_the_phase_span_they_start_in():
    spans = {"a": [(0.0, 10.0), (20.0, 30.0)], "b": [(10.0, 20.0)]}
    kernels = [(1.0, 2.0), (9.0, 3.0), (10.0, 5.0), (25.0, 1.0), (40.0, 7.0)]  # (start, duration) µs
    assert kernels_in(spans, kernels) == {"a": 6e-6, "b": 5e-6}  # the kernel at 40 µs is in none


def test_host_syncs_are_each_located_by_file_and_line():
    package = Path(mow.__file__).resolve().parent

    def warning(message: str, filename: Path, lineno: int) -> warnings.WarningMessage:
        return warnings.WarningMessage(UserWarning(message), UserWarning, str(filename), lineno)

    sync = "called a synchronizing CUDA operation"
    caught = [warning(sync, package / "models" / "row_groups.py", 61),
              warning(sync, Path("/usr/lib/python3/site-packages/torch/nn/utils/clip_grad.py"), 40),
              warning(sync, Path("/opt/src/project/tools/step.py"), 7),
              warning("an unrelated warning", package / "bench.py", 3),
              warning(sync, package / "bench.py", 130)]
    assert sync_sites(caught) == ["mow/models/row_groups.py:61", "torch/nn/utils/clip_grad.py:40",
                                  "project/tools/step.py:7", "mow/bench.py:130"]
