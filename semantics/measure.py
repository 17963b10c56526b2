"""Finite unnormalised measures: the denotations compared by the validity checks."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import numpy as np

__all__ = ["Measure", "outcome_key"]


class Measure:
    """A finite measure ``Σ_k mass[k] · δ(k)`` over hashable outcomes, in float64."""

    def __init__(self, items: Iterable[tuple[Hashable, float]] = ()):
        acc: dict[Hashable, float] = defaultdict(float)
        for outcome, mass in items:
            acc[outcome] += float(mass)
        self.mass = dict(acc)

    @classmethod
    def from_log(cls, items: Iterable[tuple[Hashable, float]]) -> Measure:
        return cls((k, math.exp(lw)) for k, lw in items)

    def total(self) -> float:
        """The total mass Z."""
        return math.fsum(self.mass.values())

    def normalized(self) -> Measure:
        z = self.total()
        return Measure((k, m / z) for k, m in self.mass.items())

    def map(self, fn: Callable[[Hashable], Hashable]) -> Measure:
        """The pushforward measure under ``fn`` (e.g. a marginal)."""
        return Measure((fn(k), m) for k, m in self.mass.items())

    def max_abs_diff(self, other: Measure) -> float:
        keys = set(self.mass) | set(other.mass)
        return max((abs(self.mass.get(k, 0.0) - other.mass.get(k, 0.0)) for k in keys), default=0.0)

    def tv(self, other: Measure) -> float:
        """Total-variation distance between the *normalised* measures."""
        a, b = self.normalized(), other.normalized()
        keys = set(a.mass) | set(b.mass)
        return 0.5 * math.fsum(abs(a.mass.get(k, 0.0) - b.mass.get(k, 0.0)) for k in keys)

    def __repr__(self) -> str:
        items = sorted(self.mass.items(), key=lambda kv: -kv[1])[:8]
        body = ", ".join(f"{k}: {m:.6g}" for k, m in items)
        more = "" if len(self.mass) <= 8 else f", … ({len(self.mass)} outcomes)"
        return f"Measure(Z={self.total():.6g}; {body}{more})"


def outcome_key(choices: dict[str, Any]) -> tuple:
    """A hashable outcome from a choice map: sorted ``(name, value)`` with values as nested tuples."""
    return tuple(sorted((name, _hashable(v)) for name, v in choices.items()))


def _hashable(v: Any) -> Hashable:
    arr = np.asarray(v)
    return arr.item() if arr.ndim == 0 else tuple(arr.tolist())
