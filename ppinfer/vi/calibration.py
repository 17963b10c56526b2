"""Variational simulation-based calibration (VSBC; Yao, Vehtari, Simpson & Gelman 2018, "Yes, but
did it work?"), as NumPyro's ``numpyro.infer.calibration.vsbc_diagnostic`` computes it.

For ``m = 1..M``: draw ``θ*_m ~ p(θ)`` and ``y_m ~ p(y | θ*_m)`` from the model, fit the guide
``q_m`` to ``y_m`` by VI, and record, per scalar component of every latent site,

    p_m = Pr_{q_m}(θ < θ*_m)      estimated from L guide draws as (rank_m + u_m) / (L + 1),

``rank_m = #{draws < θ*_m}``, ``u_m ~ U(0, 1)``. If ``q_m`` is the exact posterior, ``θ*_m`` and the
L draws are exchangeable, so the rank is uniform on ``{0..L}`` and ``p_m ~ U(0, 1)`` *exactly*
(the jitter ``u`` removes the Monte Carlo grid). VSBC's property is weaker: a guide whose marginal
point estimates are unbiased on average over the prior makes the distribution of ``p`` symmetric
about 1/2; a guide biased in one direction skews it. Two tests per component:

- **symmetry** (VSBC): Yao et al.'s Kolmogorov–Smirnov distance between ``p`` and ``1 − p``. Ordering
  the ``M`` values by decreasing ``|p_m − 1/2|``, that distance is ``max_k |S_k| / M`` for the walk
  ``S_k`` of their signs ``sign(p_m − 1/2)``; under symmetry the signs are i.i.d. ±1 independently of
  the order, so the statistic's null law is the maximum of a simple random walk and the p-value is
  computed exactly (not the two-sample KS approximation, whose samples ``p`` and ``1 − p`` are not
  independent). Level ≤ α for every ``M``. It does not flag a guide that is unbiased but too narrow
  or too wide (``p`` then piles symmetrically at the ends or the middle).
- **uniformity** (SBC): the one-sample Kolmogorov–Smirnov test of ``p ~ U(0, 1)``; flags any
  miscalibration, dispersion included; exact level under an exact guide.

False-failure rate: a component is flagged at p-value < α / C (Bonferroni over the C scalar
components of all latent sites), so an exact guide fails a test with probability ≤ α, up to the
optimisation error of the M fits (the guide is only as exact as its fit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers
from numpyro.distributions.distribution import Unit
from scipy.stats import kstest

from ppinfer import checks
from ppinfer._compile import locked
from ppinfer.errors import ConfigError, InferenceError, ModelError
from ppinfer.program import is_sequential
from ppinfer.vi.algorithm import build_step, init_fit_state
from ppinfer.vi.estimators import Estimators, check_estimators
from ppinfer.vi.objectives import Objective, elbo
from ppinfer.vi.params import constrain, find_params

__all__ = ["VSBCResult", "vsbc", "symmetry_test", "max_walk_tail"]

TESTS = ("symmetry", "uniformity")


class VSBCResult(NamedTuple):
    """The outcome of :func:`vsbc`; per latent site ``name`` (arrays of the site's shape ``S``):

    Attributes:
        probabilities: ``f64[M, *S]``: ``p_m = Pr_{q_m}(θ < θ*_m)`` (randomised rank, see module doc).
        symmetry_pvalues: ``f64[*S]``: exact p-value of the symmetry test (VSBC).
        uniformity_pvalues: ``f64[*S]``: p-value of the KS test of ``p ~ U(0, 1)`` (SBC).
        true_values: ``[M, *S]``: the simulated ``θ*_m``.
        false_failure_rate: α; a test fails where its p-value < α / (number of scalar components).
    """

    probabilities: dict[str, np.ndarray]
    symmetry_pvalues: dict[str, np.ndarray]
    uniformity_pvalues: dict[str, np.ndarray]
    true_values: dict[str, np.ndarray]
    false_failure_rate: float

    @property
    def num_components(self) -> int:
        return sum(int(np.prod(np.shape(v))) for v in self.symmetry_pvalues.values())

    def flagged(self, test: str = "symmetry") -> dict[str, np.ndarray]:
        """name → ``bool[*S]``: components whose ``test`` (``"symmetry"`` or ``"uniformity"``)
        p-value is below ``α / C``."""
        if test not in TESTS:
            raise ConfigError(f"test must be one of {TESTS}, got {test!r}")
        pvals = self.symmetry_pvalues if test == "symmetry" else self.uniformity_pvalues
        cut = self.false_failure_rate / self.num_components
        return {n: np.asarray(p) < cut for n, p in pvals.items()}

    def passed(self, test: str = "symmetry") -> bool:
        """No component flagged by ``test`` (VSBC proper is ``"symmetry"``)."""
        return not any(bool(np.any(f)) for f in self.flagged(test).values())


@locked  # traces programs under NumPyro's global handler stack: thread-safe, like infer
def vsbc(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple = (),
    *,
    objective: Objective | None = None,
    optimizer: optax.GradientTransformation | None = None,
    num_steps: int = 1000,
    num_simulations: int = 100,
    num_draws: int = 1000,
    estimators: Estimators = None,
    false_failure_rate: float = 0.01,
    batch_size: int | None = None,
    data_to_args: Callable[[dict[str, jax.Array], tuple], tuple] | None = None,
    key: Any = 0,
) -> VSBCResult:
    """Variational simulation-based calibration of ``guide`` for ``model`` (module docstring).

    Args:
        model: a static program whose observations are ``observe``/``sample(obs=…)`` sites; ``args``
            are its arguments (the real data, used for shapes only). Each simulation replaces every
            observed value by a draw from the model (NumPyro's ``uncondition``) and fits
            ``condition(model, simulated data)`` called with the simulated arguments.
        guide: a program sampling every latent site of the model, with ``numpyro.param`` sites.
        objective: what each fit maximises (default ``elbo(1)``); ``optimizer`` default
            ``optax.adam(1e-2)``; ``num_steps`` optimisation steps per fit (from the guide's
            initial parameters).
        num_simulations: M ≥ 2 simulated data sets; ``num_draws``: L ≥ 1 guide draws per fit.
        false_failure_rate: α of :meth:`VSBCResult.passed`.
        batch_size: fits run vmapped, all M at once (``None``) or ``batch_size`` at a time.
        data_to_args: ``(simulated observations name → array, args) → args`` for model and guide
            (a guide may read the data). Default: every leaf of ``args`` that *is* the value observed
            at a site (``observe("y", d, y)`` with ``y`` an argument) is replaced by that site's
            simulated value; other arguments are passed unchanged.
        key: int seed or PRNG key.

    Raises :class:`ModelError` for a model without observed or latent sites, with a discrete latent
    site, a ``factor``/``condition`` site (the prior cannot be simulated) or ``param`` sites;
    :class:`InferenceError` if a fit's objective or gradient is not finite.
    """
    if is_sequential(model):
        raise ConfigError("vsbc needs a static program (a sequential program is not supported)")
    objective = elbo() if objective is None else objective
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    m = checks.check_int("num_simulations", num_simulations, 2)
    num_draws = checks.check_int("num_draws", num_draws, 1)
    num_steps = checks.check_int("num_steps", num_steps, 1)
    alpha = checks.check_probability("false_failure_rate", false_failure_rate)
    check_estimators(estimators)
    if not isinstance(objective, Objective):
        raise ConfigError(f"objective must be a ppinfer.vi Objective (elbo(), iwelbo(K)…), got {objective!r}")
    if batch_size is not None:
        batch_size = checks.check_int("batch_size", batch_size, 1)
    key = checks.as_key(key)
    k_find, k_sims = jax.random.split(key)

    observed, latent, arg_sites = _sites(k_find, model, args)
    if data_to_args is None:
        data_to_args = _replace_leaves(args, arg_sites)
    spec = find_params(k_find, [(guide, args)])
    if not spec.init:
        raise ConfigError("the guide has no numpyro.param site: nothing to fit")

    def one(key):
        k_sim, k_fit, k_draw, k_u = jax.random.split(key, 4)
        sim = _simulate(k_sim, model, args)
        truth = {n: sim[n]["value"] for n in latent}
        data = {n: sim[n]["value"] for n in observed}
        sim_args = tuple(data_to_args(data, args))
        fitted = handlers.condition(model, data=data)
        step = build_step(fitted, guide, objective, optimizer, spec.constraints, estimators)
        body = lambda s, _: step(jax.random.fold_in(k_fit, s.step), s, sim_args)
        state, info = jax.lax.scan(body, init_fit_state(spec.init, optimizer), None, length=num_steps)
        params = constrain(state.params, spec.constraints)
        draws = _guide_draws(k_draw, guide, params, sim_args, num_draws)
        probs = {}
        for i, n in enumerate(latent):
            rank = jnp.sum(draws[n] < truth[n], axis=0)
            u = jax.random.uniform(jax.random.fold_in(k_u, i), jnp.shape(truth[n]))
            probs[n] = (rank + u) / (num_draws + 1)
        return probs, truth, jnp.all(info.finite)

    keys = jax.random.split(k_sims, m)
    run = jax.vmap(one) if batch_size is None else lambda ks: jax.lax.map(one, ks, batch_size=batch_size)
    probs, truth, finite = jax.jit(run)(keys)
    finite = np.asarray(finite)
    if not finite.all():
        raise InferenceError(
            f"{int((~finite).sum())} of {m} VSBC fits had a non-finite objective or gradient; lower "
            "the learning rate or check the guide's initial parameters"
        )
    probs = {n: np.asarray(v, np.float64) for n, v in probs.items()}
    sym = {n: _per_component(lambda x: symmetry_test(x)[1], p) for n, p in probs.items()}
    uni = {n: _per_component(lambda x: kstest(x, "uniform").pvalue, p) for n, p in probs.items()}
    return VSBCResult(probs, sym, uni, {n: np.asarray(v) for n, v in truth.items()}, alpha)


def symmetry_test(probabilities: Any) -> tuple[float, float]:
    """``(statistic, p-value)`` of "the law of ``probabilities: f[M]`` is symmetric about 1/2".

    ``statistic`` is the Kolmogorov–Smirnov distance between the empirical laws of ``p`` and
    ``1 − p`` (Yao et al.'s, and ``scipy.stats.ks_2samp(p, 1 − p).statistic``), which equals
    ``max_k |S_k| / M`` for the partial sums ``S_k`` of ``sign(p − 1/2)`` in order of decreasing
    ``|p − 1/2|``. Under the hypothesis the signs are i.i.d. ±1 independently of that order, so
    the p-value is exact: ``Pr(max_{k ≤ M} |walk_k| ≥ M · statistic)`` (:func:`max_walk_tail`)."""
    d = np.asarray(probabilities, np.float64).reshape(-1) - 0.5
    if d.size == 0:
        raise ConfigError("symmetry_test needs at least one probability")
    signs = np.sign(d[np.argsort(-np.abs(d), kind="stable")])
    level = int(np.max(np.abs(np.cumsum(signs))))
    return level / d.size, max_walk_tail(d.size, level)


def max_walk_tail(num_steps: int, level: int) -> float:
    """``Pr(max_{k ≤ n} |S_k| ≥ level)`` for the simple symmetric random walk ``S`` (steps ±1 with
    probability 1/2, ``S_0 = 0``) over ``n = num_steps`` steps, exactly (dynamic programming over the
    positions strictly inside ``±level``; float64)."""
    if level <= 0:
        return 1.0
    if level > num_steps:
        return 0.0
    inside = np.zeros(2 * level - 1)  # positions −(level−1)..level−1
    inside[level - 1] = 1.0
    for _ in range(num_steps):
        nxt = np.zeros_like(inside)
        nxt[1:] += 0.5 * inside[:-1]
        nxt[:-1] += 0.5 * inside[1:]
        inside = nxt
    return float(max(0.0, 1.0 - inside.sum()))


def _per_component(test: Callable[[np.ndarray], float], p: np.ndarray) -> np.ndarray:
    flat = p.reshape(p.shape[0], -1)
    return np.asarray([test(flat[:, j]) for j in range(flat.shape[1])]).reshape(p.shape[1:])


def _simulate(key: jax.Array, model: Callable[..., Any], args: tuple) -> dict:
    """A trace of one prior-predictive draw: latent sites from the prior, observed sites redrawn."""
    with handlers.trace() as tr, handlers.seed(rng_seed=key), handlers.uncondition():
        model(*args)
    return tr


def _sites(key: jax.Array, model: Callable[..., Any], args: tuple) -> tuple[list, list, dict]:
    """(observed, latent) sample-site names of the model, after checking it can be simulated, and
    observed site → index of the leaf of ``args`` that is its observed value."""
    with handlers.trace() as tr, handlers.seed(rng_seed=key):
        model(*args)
    observed, latent = [], []
    for name, site in tr.items():
        if site["type"] == "param":
            raise ModelError(
                f"vsbc needs a model without learnable parameters; the model has param site {name!r}"
            )
        if site["type"] != "sample":
            continue
        if isinstance(site["fn"], Unit):
            raise ModelError(
                f"vsbc simulates data from the model, which a factor/condition site ({name!r}) prevents"
            )
        if site["is_observed"]:
            observed.append(name)
        elif site["fn"].support.is_discrete:
            raise ModelError(f"vsbc supports continuous latent sites only; {name!r} is discrete")
        else:
            latent.append(name)
    if not observed:
        raise ModelError("vsbc needs a model with observed sites (observe / sample(obs=…)) to simulate")
    checks.require_latent(latent)
    leaves = jax.tree.leaves(args)
    arg_sites = {}
    for name in observed:
        hits = [i for i, leaf in enumerate(leaves) if leaf is tr[name]["value"]]
        if hits:
            arg_sites[name] = hits[0]
    return observed, latent, arg_sites


def _replace_leaves(args: tuple, arg_sites: dict[str, int]) -> Callable[[dict, tuple], tuple]:
    leaves, treedef = jax.tree.flatten(args)

    def data_to_args(data: dict, _args: tuple) -> tuple:
        new = list(leaves)
        for name, i in arg_sites.items():
            new[i] = data[name]
        return jax.tree.unflatten(treedef, new)

    return data_to_args


def _guide_draws(key, guide, params, args, num_draws: int) -> dict[str, jax.Array]:
    """name → ``[L, …]``: every sample site of ``num_draws`` independent runs of the guide."""

    def one(k):
        with handlers.trace() as tr, handlers.seed(rng_seed=k), handlers.substitute(data=params):
            guide(*args)
        return {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}

    return jax.vmap(one)(jax.random.split(key, num_draws))
