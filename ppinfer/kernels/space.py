"""The one parameter space: continuous latent sites as a flat unconstrained vector.

Every move on continuous parameters (PMMH, particle Gibbs' θ update, the rejuvenation moves of
resample-move, tempered and IBIS SMC, SMC², the HMC/NUTS moves of tempered SMC) works on
``u: f[d]``, the sites' values mapped to ℝ by NumPyro's ``biject_to(support).inv`` and raveled.
This module is the one place that map is written.

For a program ``fn(*args)`` whose latent sites ``x`` are continuous with supports that do not depend
on other sites, :func:`space_of` returns a :class:`Space` with

- ``constrain(u) -> (x, log |det J|)``: the site values and the log-Jacobian of ``u ↦ x``;
- ``unconstrain(x) -> u``;
- ``log_prior(u, *args)``: ``log p(x(u)) + log |det J(u)|``, the log density of the prior pushed to
  ``u`` (the program's observed sites are **not** included: it is the density of the latent sites
  only), ``−inf`` outside the support or where the density is NaN;
- ``draw(key, *args) -> u``: ``u`` of one draw of the program (a draw from the pushed prior).

**Validity.** A target density on ``x`` becomes a density on ``u`` by adding the log-Jacobian, so an
MH or HMC move that leaves ``log_prior(u) + log L(x(u))`` invariant leaves the posterior of ``x``
invariant. ``tests/test_space.py`` checks the Jacobian against a numerical one and the pushed prior's
normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import biject_to

from ppinfer import checks
from ppinfer.errors import ConfigError, ModelError
from ppinfer.weighted import reweighted

__all__ = ["Space", "space_of"]


class Space(NamedTuple):
    """A flat unconstrained space over named continuous sites (see the module docstring).

    Attributes:
        fn: the program whose latent sites the space covers.
        names: the site names, sorted (the ravel order of ``u``).
        transforms: name → the bijection from ℝⁿ onto the site's support.
        unravel: ``f[d] -> {name: unconstrained value}``.
        u0: ``f[d]``, a point of the space (the template draw).
        dim: ``d``.
    """

    fn: Callable[..., Any]
    names: tuple[str, ...]
    transforms: dict
    unravel: Callable
    u0: jax.Array
    dim: int

    def constrain(self, u: jax.Array) -> tuple[dict, jax.Array]:
        """``(x, log |det J|)``: the site values at ``u: f[d]`` and the log-Jacobian of ``u ↦ x``."""
        parts = self.unravel(u)
        x = {n: self.transforms[n](parts[n]) for n in self.names}
        log_det = jnp.zeros((), u.dtype)
        for n in self.names:
            log_det = log_det + jnp.sum(self.transforms[n].log_abs_det_jacobian(parts[n], x[n]))
        return x, log_det

    def unconstrain(self, x: dict) -> jax.Array:
        """``u: f[d]`` of the site values ``x`` (name → value; other keys are ignored)."""
        return ravel_pytree({n: self.transforms[n].inv(jnp.asarray(x[n])) for n in self.names})[0]

    def log_prior(self, u: jax.Array, *args: Any) -> jax.Array:
        """``log p(x(u)) + log |det J(u)|``: the prior of the space's sites pushed to ``u`` (``f[]``;
        ``−inf`` where NaN). Other latent sites of ``fn`` must not exist (see :func:`space_of`)."""
        x, log_det = self.constrain(u)
        with handlers.trace() as tr, handlers.substitute(data=x), handlers.seed(rng_seed=0):
            self.fn(*args)
        total = log_det
        for n in self.names:
            total = total + jnp.sum(tr[n]["fn"].log_prob(x[n]))
        return jnp.where(jnp.isnan(total), -jnp.inf, total)

    def draw(self, key: jax.Array, *args: Any) -> jax.Array:
        """``u: f[d]`` of one draw of ``fn(*args)`` seeded by ``key``."""
        tr = handlers.trace(handlers.seed(self.fn, key)).get_trace(*args)
        return self.unconstrain({n: tr[n]["value"] for n in self.names})


def space_of(
    fn: Callable[..., Any],
    args: tuple = (),
    *,
    sites: Sequence[str] | None = None,
    what: str = "the moves",
    key: jax.Array | int = 0,
    error: type[Exception] = ModelError,
) -> Space:
    """The :class:`Space` of ``fn(*args)``'s latent sites (or of ``sites``, a subset of them).

    Raises:
        ModelError (or ``error``: e.g. :class:`ConfigError` for a prior given in a configuration):
            ``fn`` samples no latent site, or a covered site is discrete.
        ConfigError: a name in ``sites`` is not a latent site of ``fn``.
    """
    seed = checks.as_key(key)
    with checks.program_errors(f"{what}: running the program once failed"):
        tr = handlers.trace(handlers.seed(fn, seed)).get_trace(*args)
    latent = {n: s for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
    if sites is None:
        names = tuple(latent)
        if not names:
            raise error(f"{what}: the program samples no latent site (nothing to move)")
    else:
        names = tuple(sites)
        missing = sorted(set(names) - set(latent))
        if missing:
            raise ConfigError(
                f"{what}: {missing} are not latent sample sites of the program; found {sorted(latent)}"
            )
    discrete = sorted(n for n in names if latent[n]["fn"].support.is_discrete)
    if discrete:
        raise error(f"{what}: site(s) {discrete} are discrete; only continuous sites can be moved")
    weighted = sorted(n for n in names if reweighted(latent[n]))
    if weighted:  # the moves' prior and its initial draws would disagree: not silently ignored
        raise error(
            f"{what}: latent site(s) {weighted} are masked or scaled (numpyro.handlers.mask/scale, or "
            "a subsampled plate); the parameter-space moves need each site's plain prior — use "
            "Importance, SMC, MCMC or VI for such a program"
        )
    names = tuple(sorted(names))  # the ravel order of a dict
    transforms = {n: biject_to(latent[n]["fn"].support) for n in names}
    u_tree = {n: transforms[n].inv(jnp.asarray(latent[n]["value"])) for n in names}
    u0, unravel = ravel_pytree(u_tree)
    return Space(fn, names, transforms, unravel, u0, int(u0.shape[0]))
