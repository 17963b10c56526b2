"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    fns: dict[str, Callable[[int], object]], reps: int, seed: int = 100
) -> dict[str, float]:
    """Median wall time of each ``fn(seed)`` over ``reps`` rounds, running the functions in turn
    within each round so that machine noise hits all of them alike. Each ``fn`` must block until its
    result is ready."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(seed + i)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
