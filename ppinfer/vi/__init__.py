"""Programmable variational inference (after Becker et al., PLDI 2024, genjax.vi).

Guides are programs in the DSL (NumPyro guides and autoguides work) whose ``numpyro.param`` sites are
the parameters. Objectives are expectations over guide samples of a function of first-class
densities (:func:`log_density_ratio`, :class:`Particles`), with a gradient estimator chosen per
sampled site (:mod:`ppinfer.vi.estimators`); :class:`VI` optimises one with ``optax``.
"""

from ppinfer.vi.algorithm import VI, FitState, StepInfo, build_step, fit, init_fit_state
from ppinfer.vi.calibration import VSBCResult, vsbc
from ppinfer.vi.density import Particles, log_density_ratio, sample_particles
from ppinfer.vi.estimators import ENUMERATE, REINFORCE, REPARAM, choose_estimator
from ppinfer.vi.objectives import Objective, elbo, expectation, iwelbo, renyi, rws, wake_p, wake_q
from ppinfer.vi.params import ParamSpec, bind_params, constrain, find_params, unconstrain
from ppinfer.vi.proposals import affine_gaussian_proposal
from ppinfer.vi.vsmc import VSMC

__all__ = [
    "VI",
    "fit",
    "FitState",
    "StepInfo",
    "build_step",
    "init_fit_state",
    "Objective",
    "expectation",
    "elbo",
    "iwelbo",
    "renyi",
    "wake_p",
    "wake_q",
    "rws",
    "VSMC",
    "vsbc",
    "VSBCResult",
    "Particles",
    "log_density_ratio",
    "sample_particles",
    "REPARAM",
    "REINFORCE",
    "ENUMERATE",
    "choose_estimator",
    "ParamSpec",
    "find_params",
    "constrain",
    "unconstrain",
    "bind_params",
    "affine_gaussian_proposal",
]
