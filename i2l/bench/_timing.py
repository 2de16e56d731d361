"""The one timing loop of the benchmarks: cases run in turn, round after round, so the drift of a shared machine
hits every case alike; medians of per-round ratios compare them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int,
                peaks: dict[str, float] | None = None, before: Callable[[str], None] | None = None,
                rotate: bool = False, cpu: dict[str, list[float]] | None = None,
                self_timed: bool = False) -> dict[str, list[float]]:
    """Wall seconds per call of each case over `rounds` timed rounds after `warmup` untimed ones.

    rotate: start each round at the next case, so no case always runs first (or right after the same one).
    cpu: filled with each case's process CPU seconds per call, beside the wall times returned.
    peaks (a GPU run: `Steps.peaks`): each case's peak allocated memory in GiB over all its calls; the allocator's
    peak is reset before every call, so a case is charged for its own memory only, never for an earlier case's
    (or a failed, out-of-memory attempt's). before(name) runs untimed before each call.
    self_timed: each case returns its own seconds (of a span it timed inside a call, leaving out its set-up), which
    are kept instead of the call's wall time."""
    names = list(cases)
    times: dict[str, list[float]] = {k: [] for k in names}
    if cpu is not None:
        cpu.update({k: [] for k in names})
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)] if rotate else names
        for name in order:
            if before is not None:
                before(name)
            if peaks is not None:
                import torch

                torch.cuda.reset_peak_memory_stats()  # outside the timed span: it is the allocator's bookkeeping
            t0, c0 = time.perf_counter(), time.process_time()
            got = cases[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if self_timed:
                dt = float(got)
            if r >= warmup:
                times[name].append(dt)
                if cpu is not None:
                    cpu[name].append(dc)
            if peaks is not None:
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios: robust to a noisy round (both cases of a round ran under the same load)."""
    return statistics.median(a / b for a, b in zip(num, den))
