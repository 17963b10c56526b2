"""The kernel floor: pure ``(key, state, …) -> (state, info)`` steps that the algorithms loop over.

- :mod:`ppinfer.kernels.select`: selections (resampling schemes) as pure functions of uniforms.
- :mod:`ppinfer.kernels.smc`: the one SMC step (extend → advance → select) and its loop helpers.
- :mod:`ppinfer.kernels.mh`: the one Metropolis–Hastings accept rule (:func:`~ppinfer.kernels.mh.accept`)
  and the :class:`~ppinfer.kernels.mh.Kernel` type ``(key, state) -> (state, info)``.
- :mod:`ppinfer.kernels.space`: the one parameter space (constrain, log-Jacobian, pushed prior, ravel).
- :mod:`ppinfer.kernels.anneal`: the annealing step (next temperature → reweight → select → move) and
  its population moves (random walk, HMC, NUTS), shared by tempered, data-annealed, waste-free SMC
  and IBIS.
"""

from ppinfer.kernels import anneal, mh, select, smc, space
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
    "anneal",
    "mh",
    "select",
    "smc",
    "space",
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
