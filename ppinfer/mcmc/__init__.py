"""MCMC building blocks: pure kernels over traces (MH by regeneration, programmable and independence
proposals) or over the unconstrained space (NumPyro's NUTS/HMC), and the :class:`MCMC` algorithm."""

from ppinfer.mcmc.algorithm import MCMC, MCMCResult, run_chains
from ppinfer.mcmc.base import Kernel, MHInfo, MHState, cycle, init_trace, mh_kernel, mh_step
from ppinfer.mcmc.independence import IndependenceMH
from ppinfer.mcmc.nuts import HMC, NUTS
from ppinfer.mcmc.programmable import ProgrammableMH, programmable_kernel, programmable_propose
from ppinfer.mcmc.regenerate import Regenerate, SingleSiteMH, regenerate_kernel

__all__ = [
    "MCMC",
    "MCMCResult",
    "run_chains",
    "Kernel",
    "MHState",
    "MHInfo",
    "mh_step",
    "mh_kernel",
    "init_trace",
    "cycle",
    "Regenerate",
    "SingleSiteMH",
    "regenerate_kernel",
    "ProgrammableMH",
    "programmable_kernel",
    "programmable_propose",
    "IndependenceMH",
    "NUTS",
    "HMC",
]
