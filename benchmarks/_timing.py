"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_times(
    fns: dict[str, Callable[[int], object]], reps: int, seed: int = 100
) -> dict[str, list[float]]:
    """Wall times of each ``fn(seed + i)`` over ``reps`` rounds ``i``, running the functions in turn
    within each round so that machine noise hits all of them alike. Each ``fn`` must block until its
    result is ready."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(seed + i)
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[int], object]], reps: int, seed: int = 100
) -> dict[str, float]:
    """Median wall time of each ``fn(seed)`` over ``reps`` interleaved rounds
    (:func:`interleaved_times`)."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, reps, seed).items()}


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of ``a``'s time ÷ ``b``'s in the same round: a ratio that a slow
    spell of the machine, hitting both in that round, leaves alone."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
