"""The kernel floor: pure ``(key, state, …) -> (state, info)`` steps that the algorithms loop over.

- :mod:`ppinfer.kernels.select`: selections (resampling schemes) as pure functions of uniforms.
- :mod:`ppinfer.kernels.smc`: the one SMC step (extend → advance → select) and its loop helpers.
- :mod:`ppinfer.kernels.mh`: the one Metropolis–Hastings accept rule (:func:`~ppinfer.kernels.mh.accept`)
  and the :class:`~ppinfer.kernels.mh.Kernel` type ``(key, state) -> (state, info)``.
"""

from ppinfer.kernels import mh, select, smc
from ppinfer.kernels.mh import Kernel, MHInfo, accept
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
    "mh",
    "select",
    "smc",
    "Kernel",
    "MHInfo",
    "accept",
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
