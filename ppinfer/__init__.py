"""ppinfer: probabilistic-programming inference in JAX.

Write a program with the primitives (NumPyro's ``sample``/``factor``/``deterministic``/``plate`` plus
``observe``, ``condition``, ``stop``), then ``infer(program, *args, algorithm=SMC(256), key=0)``.
"""

from ppinfer import mcmc, updates, vi
from ppinfer._jaxcache import enable_persistent_cache
from ppinfer._talk import set_verbosity
from ppinfer.algorithms import FFBS, SMC, Enumerate, Importance, Steer
from ppinfer.algorithms.particle_gibbs import ParticleGibbs
from ppinfer.algorithms.pmmh import PMMH
from ppinfer.algorithms.resample_move import ResampleMoveSMC
from ppinfer.algorithms.smc2 import SMC2
from ppinfer.algorithms.tempered import DataAnnealedSMC, TemperedSMC
from ppinfer.algorithms.waste_free import WasteFreeSMC
from ppinfer.errors import (
    CheckpointError,
    ConfigError,
    ConstraintError,
    DataError,
    EnumerationError,
    InferenceError,
    ModelError,
    PPInferError,
    TokenizerError,
    ZeroEvidenceError,
)
from ppinfer.infer import infer
from ppinfer.mcmc import HMC, MCMC, NUTS, IndependenceMH, ProgrammableMH, Regenerate, SingleSiteMH
from ppinfer.population import Population, collapse, ess, log_evidence, normalize, spawn
from ppinfer.primitives import condition, deterministic, factor, observe, plate, sample, stop
from ppinfer.program import SequentialProgram, sequential
from ppinfer.resample import resample
from ppinfer.result import Result
from ppinfer.updates import IBIS
from ppinfer.vi import VI

enable_persistent_cache()  # before the first compilation; opt out: PPINFER_COMPILATION_CACHE=0

__version__ = "0.1.0"

__all__ = [
    "infer",
    "set_verbosity",
    "SMC",
    "Steer",
    "Importance",
    "Enumerate",
    "FFBS",
    "ResampleMoveSMC",
    "PMMH",
    "SMC2",
    "ParticleGibbs",
    "TemperedSMC",
    "DataAnnealedSMC",
    "WasteFreeSMC",
    "MCMC",
    "NUTS",
    "HMC",
    "SingleSiteMH",
    "Regenerate",
    "ProgrammableMH",
    "IndependenceMH",
    "VI",
    "IBIS",
    "mcmc",
    "updates",
    "vi",
    "Result",
    "SequentialProgram",
    "sequential",
    "sample",
    "observe",
    "condition",
    "factor",
    "deterministic",
    "plate",
    "stop",
    "Population",
    "spawn",
    "resample",
    "ess",
    "normalize",
    "log_evidence",
    "collapse",
    "PPInferError",
    "ConfigError",
    "ConstraintError",
    "ModelError",
    "DataError",
    "EnumerationError",
    "InferenceError",
    "ZeroEvidenceError",
    "CheckpointError",
    "TokenizerError",
]
