"""Reference semantics and the validity harness of ppinfer.

- :func:`check_exact`: the exact expected output of the code :func:`ppinfer.infer` runs (SMC with
  any selection, Steer, Importance; the CSMC kernel's invariance), on every value of its enumerated
  randomness, against :func:`denote`.
- :func:`denote`: the exact unnormalised measure of a finite discrete program, by an interpreter
  (:mod:`semantics.interpret`) that shares no code with the algorithms.
- :mod:`semantics.blocks`: each building block's validity criterion ``E[⟦T(p)⟧] = ⟦p⟧`` as an exact
  check (resampling, spawn, collapse, proposals).
- :mod:`semantics.stats`: statistical checks (unbiasedness of Ẑ, posterior means) with stated
  false-failure rates.
- :mod:`semantics.exact`: exact answers for the model zoo (forward algorithm, Kalman filter).
- :mod:`semantics.csmc`: the conditional SMC (particle Gibbs) kernel's exact transition matrix, by
  enumerating every random input of the real sweep, and its invariance check.
"""

from semantics.blocks import (
    check_collapse,
    check_proposal,
    check_resample,
    check_spawn,
    resample_outcomes,
)
from semantics.check import ExactReport, check_exact, selection_outcomes
from semantics.csmc import check_csmc_invariance, csmc_posterior, csmc_transition_matrix
from semantics.denote import denote, measure_of
from semantics.exact import hmm_forward, kalman_filter
from semantics.measure import Measure, outcome_key
from semantics.stats import (
    CLTCheck,
    check_mean,
    check_unbiased_evidence,
    importance_log_evidence_replicates,
    log_evidence_replicates,
    smc_log_evidence_replicates,
)

__all__ = [
    "check_exact",
    "ExactReport",
    "selection_outcomes",
    "denote",
    "measure_of",
    "Measure",
    "outcome_key",
    "resample_outcomes",
    "check_resample",
    "check_spawn",
    "check_collapse",
    "check_proposal",
    "csmc_posterior",
    "csmc_transition_matrix",
    "check_csmc_invariance",
    "hmm_forward",
    "kalman_filter",
    "CLTCheck",
    "check_mean",
    "check_unbiased_evidence",
    "smc_log_evidence_replicates",
    "log_evidence_replicates",
    "importance_log_evidence_replicates",
]
