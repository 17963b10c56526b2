"""The Metropolis–Hastings accept rule, and the kernel type of the moves built on it.

Every MH move in ppinfer (the MCMC kernels of :mod:`ppinfer.mcmc`, the rejuvenation moves of
resample-move, tempered and IBIS SMC, PMMH, and the θ moves of particle Gibbs) proposes a state,
computes its log acceptance ratio and then calls :func:`accept`: this module is the one place the
accept/reject step is written.

**Validity.** Let ``π`` be the target and ``q(x' | x)`` the proposal. If ``log_alpha`` is

    log_alpha = log [ π(x') q(x | x') / (π(x) q(x' | x)) ]

(up to no constant: the normalising constants of ``π`` cancel, those of ``q`` must be included when
they depend on the state; ``−inf`` where ``π(x') = 0``; for a proposal that is its own reverse the
``q`` terms cancel), then accepting ``x'`` with probability ``min(1, exp(log_alpha))`` and otherwise
keeping ``x`` satisfies detailed balance

    π(x) q(x' | x) min(1, α(x, x')) = π(x') q(x | x') min(1, α(x', x)),

so the move leaves ``π`` invariant. :func:`accept` realises that probability exactly: with
``u ~ U[0, 1)``, ``P(log u < log_alpha) = P(u < exp(log_alpha)) = min(1, exp(log_alpha))``. A NaN
ratio (e.g. ``−inf − (−inf)``: both states outside the support) rejects. ``tests/test_mh_accept.py``
checks the rule exactly (``π K = π`` for a 3-state Metropolis kernel, by enumerating the proposal and
splitting the uniform) and shows that a shifted rule breaks invariance.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

__all__ = ["Kernel", "MHInfo", "accept"]


@runtime_checkable
class Kernel(Protocol):
    """A Markov kernel in BlackJAX's form: ``kernel(key, state) -> (state, info)``, i.e.
    ``Callable[[jax.Array, State], tuple[State, Info]]``.

    Pure and jit/vmap-able; ``key`` is its only randomness, ``state`` any pytree (a trace, a flat
    parameter vector, a batch of particles), ``info`` any pytree of diagnostics (:class:`MHInfo`
    for an MH move). A kernel is **valid** for a target ``π`` when ``x ~ π`` implies the returned
    state is ``~ π`` (it leaves ``π`` invariant); an MH move whose ratio is as in the module
    docstring is valid. Bind other arguments with :func:`functools.partial` (e.g. the ``args`` of
    :class:`ppinfer.mcmc.Kernel`'s ``step``).
    """

    def __call__(self, key: jax.Array, state: Any) -> tuple[Any, Any]: ...


class MHInfo(NamedTuple):
    """What one accept/reject step did, with the batch shape ``B`` of ``log_alpha`` (``()`` for one
    chain, ``(N,)`` for ``N`` particles or chains).

    Attributes:
        accepted: ``bool[B]`` whether the proposal was accepted.
        log_alpha: ``f[B]`` the log acceptance ratio as given, **not** clipped at 0, with NaN
            replaced by ``−inf`` (a NaN ratio rejects).
        acceptance_rate: ``f[B]`` the acceptance probability ``min(1, exp(log_alpha))`` (0 where the
            ratio was NaN): a Rao–Blackwellised acceptance rate, e.g. for step-size adaptation.
        undefined: ``bool[B]`` the ratio was NaN — from a chain in the support, a proposal whose log
            density is NaN (:class:`~ppinfer.MCMC` warns when a recorded transition had one).
    """

    accepted: jax.Array
    log_alpha: jax.Array
    acceptance_rate: jax.Array
    undefined: Any = False

    @property
    def acceptance_probability(self) -> jax.Array:
        """The same as ``acceptance_rate`` (the name ``ppinfer.mcmc.MHInfo`` used)."""
        return self.acceptance_rate


def accept(key_or_uniform: Any, log_alpha: Any, proposed: Any, current: Any) -> tuple[Any, MHInfo]:
    """The Metropolis–Hastings accept/reject step: ``proposed`` where ``log u < log_alpha``, else
    ``current``.

    Accepts with probability ``min(1, exp(log_alpha))``; that satisfies detailed balance (so leaves
    the target invariant) when ``log_alpha`` is the exact log MH ratio
    ``log [π(x') q(x | x') / (π(x) q(x' | x))]`` of the module docstring. A NaN ``log_alpha``
    rejects.

    Args:
        key_or_uniform: a PRNG key, from which ``u ~ U[0, 1)`` of ``log_alpha``'s shape and dtype is
            drawn (``jax.random.uniform(key, log_alpha.shape, log_alpha.dtype)``), or the uniform(s)
            ``u`` themselves (a float array broadcastable with ``log_alpha``; for exact enumeration
            or to keep a caller's own random stream).
        log_alpha: ``f[B]`` the log acceptance ratio; ``B`` is the batch shape (particles, chains).
        proposed, current: pytrees of the same structure whose leaves have leading axes ``B``
            (``B`` followed by any event shape); each leaf is selected with ``jnp.where``, the
            decision broadcast over the trailing axes.

    Returns:
        ``(state, info)``: the selected pytree and :class:`MHInfo`.
    """
    log_alpha = jnp.asarray(log_alpha)
    if not jnp.issubdtype(log_alpha.dtype, jnp.floating):
        log_alpha = log_alpha.astype(jnp.result_type(float))
    undefined = jnp.isnan(log_alpha)
    log_alpha = jnp.where(undefined, -jnp.inf, log_alpha)
    if _is_key(key_or_uniform):
        u = jax.random.uniform(key_or_uniform, log_alpha.shape, log_alpha.dtype)
    else:
        u = jnp.asarray(key_or_uniform)
    accepted = jnp.log(u) < log_alpha
    state = jax.tree.map(lambda p, c: _select(accepted, p, c), proposed, current)
    return state, MHInfo(accepted, log_alpha, jnp.exp(jnp.minimum(log_alpha, 0.0)), undefined)


def _is_key(x: Any) -> bool:
    """A typed PRNG key, or a raw ``uint32[..., 2]`` one."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and (
        jnp.issubdtype(dtype, jax.dtypes.prng_key) or jnp.issubdtype(dtype, jnp.unsignedinteger)
    )


def _select(accepted: jax.Array, proposed: Any, current: Any) -> jax.Array:
    """``proposed`` where ``accepted`` (broadcast over the leaf's trailing axes), else ``current``."""
    proposed, current = jnp.asarray(proposed), jnp.asarray(current)
    extra = max(proposed.ndim, current.ndim) - accepted.ndim
    if extra < 0:
        shape = proposed.shape if proposed.ndim >= current.ndim else current.shape
        raise ValueError(f"accept: a state leaf of shape {shape} lacks the batch axes {accepted.shape}")
    return jnp.where(accepted.reshape(accepted.shape + (1,) * extra), proposed, current)
