"""`mow bench --profile`'s summaries (mow/profiling.py) against hand-counted workloads: the
phases found, operator calls, gradients counted, kernels attributed to phases and host
syncs located. Times are only checked for consistency (a phase lies inside its call)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import mow
from mow.profiling import (device_work, host_ranges, host_sync_sites, kernels_in, kernels_per_call, median_phase_times,
                           params_with_grad, phase, phases_by_call, profile_call, sync_site)

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


def test_kernel_time_and_count_are_medians_over_the_calls():
    calls = [(0.0, 100.0), (100.0, 200.0), (200.0, 300.0)]  # µs
    kernels = [(10.0, 5.0), (20.0, 5.0),                       # call 1: 2 kernels, 10 µs
               (110.0, 60.0), (170.0, 20.0), (180.0, 10.0),    # call 2 (a slow one): 3, 90 µs
               (210.0, 4.0), (220.0, 8.0), (300.0, 1.0)]       # call 3: 2, 12 µs; the last is after it
    assert kernels_per_call(calls, kernels) == (12e-6, 2)  # medians: 12 µs (not the mean, 37), 2


def test_host_syncs_are_located_by_the_package_line_that_led_to_them():
    package = Path(mow.__file__).resolve().parent
    torch_code = "/usr/lib/python3/site-packages/torch"
    bench, vae = (str(package / "bench.py"), 130), (str(package / "models" / "vae.py"), 88)
    profiling = (str(package / "profiling.py"), 150)   # the collector's own frames are left out
    script = ("/opt/src/project/tools/step.py", 7)
    assert sync_site([script, bench, vae, (f"{torch_code}/nn/modules/module.py", 1775),
                      (f"{torch_code}/nn/utils/clip_grad.py", 40), profiling]) == \
        "mow/models/vae.py:88 -> torch/nn/utils/clip_grad.py:40"
    assert sync_site([script, bench, vae, profiling]) == "mow/models/vae.py:88"          # synced in our line
    assert sync_site([script, (f"{torch_code}/cuda/__init__.py", 1270)]) == \
        "torch/cuda/__init__.py:1270"                                                   # no package frame


def test_host_sync_sites_collects_sync_warnings_only_with_their_caller():
    def synchronising_call():
        warnings.warn("called a synchronizing CUDA operation")   # as torch's sync debug mode words it

    with host_sync_sites(torch.device("cpu")) as sites:
        synchronising_call()
        warnings.warn("an unrelated warning")
        synchronising_call()
    line = synchronising_call.__code__.co_firstlineno + 1
    assert len(sites) == 2 and all(site.endswith(f"tests/test_profiling.py:{line}") for site in sites)


def test_calls_phases_and_device_work_leave_out_the_device_spans_of_annotated_ranges():
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(i, name, start, end, device=DeviceType.CUDA, annotation=False):
        return FunctionEvent(i, name, thread=0, start_us=start, end_us=end, device_type=device,
                             is_user_annotation=annotation)

    events = [event(0, "phase/loss", 0, 100, DeviceType.CPU),
              event(1, "phase/loss", 5, 90, annotation=True),        # the range drawn on the GPU
              event(2, "Optimizer.step#Adam.step", 90, 99, annotation=True),
              event(3, "gemm_kernel", 5, 40), event(4, "Memcpy HtoD", 40, 42), event(5, "softmax_kernel", 60, 90)]
    assert host_ranges(events, "phase/") == [("phase/loss", 0, 100)]   # the CPU's, not the GPU's copy
    work = device_work(events)
    assert [e.name for e in work] == ["gemm_kernel", "Memcpy HtoD", "softmax_kernel"]
    assert sum(e.time_range.elapsed_us() for e in work) == 35 + 2 + 30  # not 85 + 9 more
