"""Where a benchmarked part spends its time (`mow bench --profile`): the wall time of its
named phases (loss, backward, clipping, optimiser step, ...), the operators that take the
most host time, on CUDA the kernels' device time and count and the host syncs, and how many
parameters an update gives a gradient. Profiles are summaries written into the bench JSON,
so that a claim about where a step's time goes ("MoW's optimiser step costs ten times
STORM's") is reproduced by one command on any machine instead of by a one-off script.
"""

from __future__ import annotations

import statistics
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

#: Set while `profile_call` runs: phases then wait for the device at their end, so that a
#: phase's wall time holds its kernels (CUDA runs them asynchronously, the backward's on a
#: thread of its own). Outside a profile phases add no synchronisation to the timed loop.
_SYNC_PHASES: list[torch.device] = []

_THIS = Path(__file__).resolve()
_PACKAGE = _THIS.parent
_PREFIX = "phase/"
_CALL = "profiled_call"


@contextmanager
def phase(name: str):
    """A named phase of a benchmarked part (a `record_function` range; when profiled, the
    device is synchronised before it closes)."""
    with record_function(_PREFIX + name):
        yield
        for device in _SYNC_PHASES:
            if device.type == "cuda":
                torch.cuda.synchronize(device)


def params_with_grad(*modules: torch.nn.Module) -> int:
    """Parameters that hold a gradient now: after an update that zeroed them to None, the
    ones it touched (MoW: only the clusters and experts its batch used)."""
    return sum(p.numel() for m in modules for p in m.parameters() if p.grad is not None)


def _site(filename: str, lineno: int) -> str:
    path = Path(filename)
    if path.resolve().is_relative_to(_PACKAGE):
        return f"{path.resolve().relative_to(_PACKAGE.parent)}:{lineno}"
    parts = path.parts
    if "site-packages" in parts:   # an installed package's code (torch's): from its name on
        return f"{'/'.join(parts[len(parts) - parts[::-1].index('site-packages'):])}:{lineno}"
    return f"{'/'.join(parts[-3:])}:{lineno}"


def sync_site(frames: list[tuple[str, int]]) -> str:
    """Where a synchronising CUDA call was made, from the Python stack at its warning
    (outermost first): the innermost line of this package (this module's own frames aside),
    and after an arrow the innermost frame of all where that is elsewhere (torch's code the
    package called): ``mow/models/vae.py:88 -> torch/nn/utils/clip_grad.py:40``."""
    frames = [(f, n) for f, n in frames if Path(f).resolve() != _THIS]
    ours = [(f, n) for f, n in frames if Path(f).resolve().is_relative_to(_PACKAGE)]
    innermost = _site(*frames[-1])
    if not ours or ours[-1] == frames[-1]:
        return innermost
    return f"{_site(*ours[-1])} -> {innermost}"


@contextmanager
def host_sync_sites(device: torch.device):
    """Collect :func:`sync_site` of each call that makes the host wait for ``device``
    (`torch.cuda.set_sync_debug_mode("warn")`; on CPU nothing syncs and nothing is
    collected unless warned) into the yielded list."""
    sites: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stack = [(f.filename, f.lineno) for f in traceback.extract_stack()]
            sites.append(sync_site([(f, n) for f, n in stack if Path(f).name != "warnings.py"]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show   # restored by catch_warnings
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def host_ranges(events, prefix: str) -> list[tuple[str, float, float]]:
    """(name, start, end; µs) of the host's `record_function` ranges whose names start with
    ``prefix``, in time order. On CUDA the profiler also records ranges on the GPU under the
    same names; taken for calls, they made 3 profiled calls 6, three of them holding no
    phases, and the medians over them half the real figures (H200, torch 2.11)."""
    return sorted(((e.name, e.time_range.start, e.time_range.end) for e in events
                   if e.name.startswith(prefix) and e.device_type == DeviceType.CPU), key=lambda r: r[1])


def device_work(events):
    """The events of work on the GPU (kernels, copies, memsets): not the device-side spans
    that the profiler draws for `record_function` ranges (our phases, ``Optimizer.step``),
    which cover the kernels inside them and would count their time twice."""
    return [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def kernels_in(spans: dict[str, list[tuple[float, float]]], kernels: list[tuple[float, float]]) -> dict[str, float]:
    """Device seconds of the kernels (start, duration; µs) that start inside each phase's
    host spans (start, end; µs): a profiled phase ends with a device sync, so its kernels
    run within it, whichever host thread launched them."""
    return {name: _s(sum(d for s, d in kernels if any(lo <= s < hi for lo, hi in ranges)))
            for name, ranges in spans.items()}


def kernels_per_call(call_spans: list[tuple[float, float]], kernels: list[tuple[float, float]]) -> tuple[float, float]:
    """Device seconds and number of the kernels (start, duration; µs) that start in each
    call's span, each the median over the calls, like the phases: one slow call (after the
    GPU idled, say) moves a mean, not the median."""
    seconds = [kernels_in({"call": [span]}, kernels)["call"] for span in call_spans]
    counts = [sum(lo <= start < hi for start, _ in kernels) for lo, hi in call_spans]
    return statistics.median(seconds), statistics.median(counts)


def phases_by_call(call_spans: list[tuple[float, float]], marked: list[tuple[str, float, float]]
                   ) -> list[dict[str, list[tuple[float, float]]]]:
    """The phase ranges (name, start, end) that fall in each call's span, per call and name."""
    per_call: list[dict[str, list[tuple[float, float]]]] = [{} for _ in call_spans]
    for name, start, end in marked:
        i = next(i for i, (lo, hi) in enumerate(call_spans) if lo <= start < hi)
        per_call[i].setdefault(name, []).append((start, end))
    return per_call


def median_phase_times(per_call: list[dict[str, list[tuple[float, float]]]]) -> dict[str, float]:
    """Seconds of each phase (its spans in a call summed; µs in), the median over the calls;
    a call without the phase counts 0."""
    names = sorted({name for spans in per_call for name in spans})
    return {name: _s(statistics.median(sum(hi - lo for lo, hi in spans.get(name, ())) for spans in per_call))
            for name in names}


def _s(microseconds: float) -> float:
    return round(microseconds / 1e6, 6)


def profile_call(fn, device: torch.device, calls: int = 3, top: int = 12) -> dict:
    """Profile ``calls`` calls of ``fn`` (already warmed up). One call's figures move by tens
    of percent on a shared machine, so times are medians over the calls: each call's wall
    time under the profiler (which adds some) and each `phase`'s. Operators (the ``top`` by
    host self time) are per call, averaged. On CUDA also the kernels' device time and count
    per call, the top kernels, each phase's kernel time (median) and the host syncs of one
    more, unprofiled call."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _SYNC_PHASES.append(device)
    try:
        with profile(activities=activities) as prof:
            for _ in range(calls):
                with record_function(_CALL):
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
    finally:
        _SYNC_PHASES.remove(device)
    events = prof.events()
    call_spans = [(start, end) for _, start, end in host_ranges(events, _CALL)]
    spans = phases_by_call(call_spans, [(name.removeprefix(_PREFIX), start, end)
                                        for name, start, end in host_ranges(events, _PREFIX)])
    ops = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::"))]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    out = {"calls": calls,
           "wall_s": _s(statistics.median(hi - lo for lo, hi in call_spans)),
           "phases_s": median_phase_times(spans),
           "top_ops": [{"name": e.key, "calls": e.count / calls, "self_cpu_s": _s(e.self_cpu_time_total / calls)}
                       for e in ops[:top]]}
    if device.type == "cuda":
        kernels = [(e.time_range.start, e.time_range.elapsed_us()) for e in device_work(events)]
        per_call = [kernels_in(call, kernels) for call in spans]
        by_kernel = device_work(prof.key_averages())
        by_kernel.sort(key=lambda e: e.self_device_time_total, reverse=True)
        out["device"] = {
            **dict(zip(("kernel_s", "kernels"), kernels_per_call(call_spans, kernels))),
            "phases_kernel_s": {name: statistics.median(c.get(name, 0.0) for c in per_call) for name in out["phases_s"]},
            "top_kernels": [{"name": e.key[:120], "calls": e.count / calls,
                             "self_device_s": _s(e.self_device_time_total / calls)} for e in by_kernel[:top]]}
        with host_sync_sites(device) as sites:
            fn()
        torch.cuda.synchronize(device)
        out["host_sync_sites"] = sites
        out["host_syncs"] = len(sites)
    return out
