"""The kernel floor: pure ``(key, state, …) -> (state, info)`` steps that the algorithms loop over.

- :mod:`ppinfer.kernels.select`: selections (resampling schemes) as pure functions of uniforms.
- :mod:`ppinfer.kernels.smc`: the one SMC step (extend → advance → select) and its loop helpers.
"""

from ppinfer.kernels import select, smc
from ppinfer.kernels.select import (
    Adaptive,
    FearnheadClifford,
    Grouped,
    Multinomial,
    Residual,
    Selection,
    Stratified,
    Systematic,
    as_selection,
)

__all__ = [
    "select",
    "smc",
    "Selection",
    "Multinomial",
    "Stratified",
    "Systematic",
    "Residual",
    "Adaptive",
    "Grouped",
    "FearnheadClifford",
    "as_selection",
]
