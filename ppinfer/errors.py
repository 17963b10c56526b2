"""The ppinfer exception hierarchy.

Every error that ppinfer raises on bad input is a :class:`PPInferError`, so ``except PPInferError``
catches them all; each subclass also derives from the built-in type a Python user would expect
(``ValueError`` for bad values, ``RuntimeError`` for inference that cannot proceed).
"""

from __future__ import annotations


class PPInferError(Exception):
    """Base class of every error raised by ppinfer."""


class ConfigError(PPInferError, ValueError):
    """An algorithm or function was given invalid settings (e.g. ``num_particles < 1``)."""


class ModelError(PPInferError, ValueError):
    """The program is ill-formed: invalid distribution parameters, shapes, or missing choices."""


class DataError(PPInferError, ValueError):
    """Data passed to a program is invalid (NaN, wrong shape or dtype)."""


class EnumerationError(PPInferError, ValueError):
    """Exact enumeration is impossible: a continuous choice, or too many branches."""


class InferenceError(PPInferError, RuntimeError):
    """Inference ran but could not produce a meaningful result."""


class ZeroEvidenceError(InferenceError):
    """Every particle has weight zero (log weight −inf): the observations or constraints are
    impossible under every sampled execution."""


class CheckpointError(PPInferError, ValueError):
    """A model checkpoint folder is missing, corrupt, unsafe (pickle) or does not match its config."""


class TokenizerError(PPInferError, ValueError):
    """A tokenizer file is missing or invalid, or text cannot be encoded."""


class ConstraintError(ConfigError):
    """A generation constraint (regular expression, JSON schema, grammar) is invalid, unsupported,
    or too large to compile within its size and time limits."""


class PPInferWarning(UserWarning):
    """Base class of the warnings ppinfer issues about a run whose results may be unreliable."""


class UndefinedDensityWarning(PPInferWarning):
    """MH proposals had a NaN log density and were rejected: the chain then samples the posterior
    restricted to where the program's density is defined (check the distribution parameters)."""


class DivergenceWarning(PPInferWarning):
    """NUTS/HMC transitions diverged after warm-up: the sampler could not follow the posterior's
    geometry there, so its draws may be biased (reparametrise, e.g. non-centred, or raise
    ``target_accept_prob``)."""


class ConvergenceWarning(PPInferWarning):
    """MCMC chains disagree (split R-hat above 1.1 for some site): they have not mixed, and their
    pooled draws may be far from the posterior (run longer, or for PMMH use more particles)."""


class ProposalSupportWarning(PPInferWarning):
    """A proposal's (or guide's) distribution at a latent site does not cover the program's support
    there: the weights target the posterior restricted to the proposal's support, which is the
    posterior only if the program puts no mass outside it."""


class BroadcastWarning(PPInferWarning):
    """An observed site's value (or mask) broadcast against its distribution into more likelihood
    terms than either has — e.g. data of shape ``(5, 1)`` under a plate of 5 gives ``5 × 5`` terms,
    each observation scored under every distribution: a silently wrong likelihood unless meant."""
