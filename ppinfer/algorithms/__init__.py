"""Inference algorithms: each a composition of the building blocks, selectable in ``infer``."""

from ppinfer.algorithms.enumerate import Enumerate
from ppinfer.algorithms.ffbs import FFBS
from ppinfer.algorithms.importance import Importance
from ppinfer.algorithms.smc import SMC
from ppinfer.algorithms.smc2 import SMC2
from ppinfer.algorithms.steer import Steer
from ppinfer.algorithms.tempered import DataAnnealedSMC, TemperedSMC
from ppinfer.algorithms.waste_free import WasteFreeSMC

__all__ = [
    "Enumerate",
    "FFBS",
    "Importance",
    "SMC",
    "SMC2",
    "Steer",
    "TemperedSMC",
    "DataAnnealedSMC",
    "WasteFreeSMC",
]
