"""When a process has stopped growing: the warm-up rule of `mow bench` and
`mow bench-versions`.

Standard library only: `mow bench-versions` loads this file by path into workers that run
another version's package as ``mow``, which may predate it.
"""

from __future__ import annotations

import resource

#: Warm-up ends after SETTLE_QUIET_ROUNDS rounds in a row whose page faults each touch less
#: memory than SETTLE_FAULT_SHARE of the process's peak resident size, or after
#: MAX_SETTLE_ROUNDS rounds (`settle`).
SETTLE_FAULT_SHARE = 0.01
SETTLE_QUIET_ROUNDS = 2
MAX_SETTLE_ROUNDS = 10


def minor_page_faults() -> int:
    """Page faults this process has taken without I/O so far. With the CPU allocator
    retaining freed memory (`retain_cpu_memory`), nearly all of them are first writes to
    pages the heap has just grown by, each zero-filled by the kernel."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fault_limit(peak_bytes: float) -> int:
    """Page faults a quiet round stays under: SETTLE_FAULT_SHARE of ``peak_bytes``."""
    return int(SETTLE_FAULT_SHARE * peak_bytes / resource.getpagesize())


def settle(run_round, limit_faults: int, quiet: int = SETTLE_QUIET_ROUNDS,
           max_rounds: int = MAX_SETTLE_ROUNDS) -> tuple[int, bool]:
    """Call ``run_round`` (one untimed round; returns its page faults) until ``quiet``
    rounds in a row take fewer than ``limit_faults`` each, at most ``max_rounds`` times;
    return (rounds run, whether they ended quiet).

    Why: a process's heap keeps growing for several rounds after the first (freed blocks
    do not yet fit the next round's sizes), and the pages it grows by fault on first touch.
    On the reference CPU, at the paper scale, STORM's imagination took 7.7 s in a round
    that faulted 1.9 GB in and 4.8-5.2 s in the rounds after; MoW's process grew for 5-6
    rounds, to 6.8 GB. A training run does thousands of updates past that point, so the
    timed rounds start once the growth has stopped. One quiet round is not enough: with
    the first under 1 % in a run, STORM's next imagination still faulted 128 MiB in."""
    in_a_row = 0
    for rounds in range(1, max_rounds + 1):
        in_a_row = in_a_row + 1 if run_round() < limit_faults else 0
        if in_a_row == quiet:
            return rounds, True
    return max_rounds, False
