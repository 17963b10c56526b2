"""Particle Gibbs: the conditional SMC kernel leaves the exact smoothing posterior invariant (finite
HMM, chi-square test), a kernel that drops the reference does not, and the Gibbs sampler with static
parameter updates recovers an LGSSM parameter posterior computed exactly with the Kalman filter."""

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy.stats import chi2

import ppinfer as pp
from models.classic import discrete_hmm, lgssm_unknown_coefficient, simulate_lgssm
from ppinfer.algorithms.particle_gibbs import ParticleGibbs, Trajectory, csmc
from semantics import denote
from semantics.exact import lgssm_coefficient_posterior

# A 2-state HMM with T = 3 steps: 8 trajectories, posterior spread over all of them (min 0.0096).
HMM = discrete_hmm([0.5, 0.5], [[0.7, 0.3], [0.4, 0.6]], [-1.0, 1.0], 1.0)
YS = jnp.array([0.4, -0.2, 0.9], jnp.float32)
CHAINS = 20_000
# Each chi-square check fails with probability 1e-3 when the kernel is valid (3 checks: ≤ 3e-3).
ALPHA = 1e-3


def exact_posterior() -> np.ndarray:
    """``f64[8]``: p(x_0, x_1, x_2 | y) by enumeration, cell index ``4 x_0 + 2 x_1 + x_2``."""
    post = denote(HMM, YS).normalized()
    probs = np.zeros(8)
    for key, mass in post.mass.items():
        x = dict(key)
        probs[4 * x["0/x"] + 2 * x["1/x"] + x["2/x"]] += mass
    return probs


def one_step(step, probs: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Start CHAINS chains from exact posterior draws, apply ``step`` once (vmapped); return the
    output cell counts ``[8]`` and whether each chain's trajectory changed ``bool[CHAINS]``."""
    cells = np.random.default_rng(seed).choice(8, size=CHAINS, p=probs)
    x = np.stack([cells // 4, (cells // 2) % 2, cells % 2], axis=1).astype(np.int32)
    refs = Trajectory({}, {"x": jnp.asarray(x)}, jnp.ones((CHAINS, 3), bool))
    keys = jax.random.split(jax.random.PRNGKey(seed), CHAINS)
    new, _ = jax.jit(jax.vmap(lambda k, r: step(k, r, (YS,))))(keys, refs)
    out = np.asarray(new.steps["x"])
    out_cells = 4 * out[:, 0] + 2 * out[:, 1] + out[:, 2]
    return np.bincount(out_cells, minlength=8), out_cells != cells


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(chi2.sf(np.sum((counts - expected) ** 2 / expected), df=len(probs) - 1))


@pytest.fixture(scope="module")
def posterior():
    probs = exact_posterior()
    assert probs.min() > 0.005  # every cell expects ≥ 100 chains: the chi-square approximation holds
    return probs


@pytest.mark.parametrize("num_particles, ancestor_sampling", [(2, False), (4, True)])
def test_csmc_leaves_exact_posterior_invariant(posterior, num_particles, ancestor_sampling):
    kernel = csmc(HMM, (YS,), num_particles, ancestor_sampling=ancestor_sampling)
    counts, moved = one_step(kernel.step, posterior, seed=num_particles)
    assert chi_square_p(counts, posterior) > ALPHA
    # An identity kernel would pass the invariance check: this one must actually move.
    assert moved.mean() > 0.1


def test_csmc_invariant_when_particles_stop():
    # The HMM whose particle ends after step 1 when x_1 = 1: trajectories have different lengths
    # (6 outcomes); the reference's stop and the stopped particles' frozen weights must be handled.
    def step(x, t, ys):
        x = HMM.step(x, t, ys)
        pp.stop((x == 1) & (t == 1))
        return x

    program = pp.sequential(HMM.init, step, 3)
    post = denote(program, YS).normalized()
    outcomes = sorted(post.mass)
    probs = np.array([post.mass[o] for o in outcomes])
    assert probs.min() > 0.005
    cells = np.random.default_rng(3).choice(len(outcomes), size=CHAINS, p=probs)
    x, active = np.zeros((CHAINS, 3), np.int32), np.zeros((CHAINS, 3), bool)
    for i, c in enumerate(cells):
        for name, value in outcomes[c]:
            t = int(name.split("/")[0])
            x[i, t], active[i, t] = value, True
    refs = Trajectory({}, {"x": jnp.asarray(x)}, jnp.asarray(active))
    kernel = csmc(program, (YS,), 3)
    keys = jax.random.split(jax.random.PRNGKey(3), CHAINS)
    new, _ = jax.jit(jax.vmap(lambda k, r: kernel.step(k, r, (YS,))))(keys, refs)
    out_x, out_active = np.asarray(new.steps["x"]), np.asarray(new.active)
    index = {o: j for j, o in enumerate(outcomes)}
    out = [
        index[tuple((f"{t}/x", int(out_x[i, t])) for t in range(3) if out_active[i, t])]
        for i in range(CHAINS)
    ]
    counts = np.bincount(out, minlength=len(outcomes))
    assert chi_square_p(counts, probs) > ALPHA
    assert np.mean(np.asarray(out) != cells) > 0.1


def test_kernel_that_drops_the_reference_is_not_invariant(posterior):
    # "Forgetting" the reference turns CSMC into one independent SMC run + one draw from its final
    # weights (the kernel's own init): with N = 2 its law is far from the posterior.
    kernel = csmc(HMM, (YS,), 2)
    broken = lambda key, ref, args: (kernel.init(key, args), None)
    counts, _ = one_step(broken, posterior, seed=7)
    assert chi_square_p(counts, posterior) < ALPHA


# LGSSM with an unknown AR coefficient (the model of tests/test_pmmh.py).
Q, C, R = 0.5, 1.0, 0.5
prior, LGSSM = lgssm_unknown_coefficient(Q, C, R)


def test_particle_gibbs_recovers_lgssm_parameter():
    ys = simulate_lgssm(3, 40, 0.7, Q, C, R)
    exact_mean, exact_sd = lgssm_coefficient_posterior(ys, Q, C, R)

    algorithm = ParticleGibbs(
        10, num_samples=1000, num_warmup=200, num_chains=4, prior=prior, ancestor_sampling=True
    )
    r = pp.infer(LGSSM, ys, algorithm=algorithm, key=0)
    idata = r.to_arviz()
    assert float(az.rhat(idata)["a"]) < 1.05
    mcse = float(az.mcse(idata)["a"])
    # Mean within 4 MCSE of the exact posterior mean (false-failure rate ~6e-5 if the MCSE is right).
    assert abs(float(r.mean("a")) - exact_mean) < 4 * mcse + 0.005
    assert float(r.std("a")) == pytest.approx(exact_sd, rel=0.2)
    assert 0.1 < float(np.mean(r.extras["acceptance_rate"])) < 0.7
    assert r.samples["x"].shape == (4000, 40)
    # Ancestor sampling keeps updating the start of the trajectory (no path degeneracy): x_0 changes
    # in most sweeps (plain CSMC with 10 particles and 40 steps almost never changes it), and every
    # step changes in a good fraction of them.
    update_rate = np.mean(r.extras["update_rate"], axis=0)
    assert update_rate[0] > 0.5 and update_rate.min() > 0.2


def test_errors():
    with pytest.raises(pp.ConfigError, match="num_particles >= 2"):
        ParticleGibbs(1)
    with pytest.raises(pp.ConfigError, match="num_particles >= 2"):
        csmc(HMM, (YS,), 1)
    with pytest.raises(pp.ConfigError, match="theta_moves"):
        ParticleGibbs(4, theta_moves=0)
    with pytest.raises(pp.ConfigError, match="sequential"):
        pp.infer(prior, YS, algorithm=ParticleGibbs(4))
    with pytest.raises(pp.ConfigError, match="csmc needs a sequential program"):
        csmc(prior, (YS,), 4)
    for bad in (0.0, -1.0, "0.2", None, float("nan")):
        with pytest.raises(pp.ConfigError, match="step_size must be a finite number > 0"):
            ParticleGibbs(4, step_size=bad)
    for bad in (0.0, 1.0, "0.3", float("nan")):
        with pytest.raises(pp.ConfigError, match=r"target_accept must be a number in \(0, 1\)"):
            ParticleGibbs(4, target_accept=bad)
    with pytest.raises(pp.ConfigError, match="prior must be a program"):
        ParticleGibbs(4, prior=3)

    # A parameter site that is also a site of the program would be sampled twice.
    def clash(ys):
        pp.sample("a", dist.Uniform(-1.0, 1.0))
        pp.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(pp.ModelError, match=r"parameter site\(s\) \['x'\] are also sites of the program"):
        pp.infer(
            LGSSM, YS, algorithm=ParticleGibbs(4, num_samples=2, num_warmup=0, num_chains=1, prior=clash)
        )
    with pytest.raises(pp.ConfigError, match="discrete"):
        pp.infer(LGSSM, YS, algorithm=ParticleGibbs(4, prior=lambda ys: pp.sample("a", dist.Bernoulli(0.5))))

    def no_choice(x, t, ys):
        pp.observe("y", dist.Normal(x, 1.0), ys[t])
        return x

    silent = pp.sequential(lambda ys: jnp.zeros(()), no_choice, 3)
    with pytest.raises(pp.ModelError, match="no random choice"):
        pp.infer(silent, YS, algorithm=ParticleGibbs(4))


def test_ancestor_sampling_rejects_non_markov_program():
    # The state carries a running sum: a step's state depends on its ancestor's, so the one-step
    # ancestor-sampling weight would be wrong; the kernel detects it and the algorithm refuses.
    def running(s, t, ys):
        x = pp.sample("x", dist.Normal(0.0, 1.0))
        pp.observe("y", dist.Normal(s + x, 1.0), ys[t])
        return s + x

    program = pp.sequential(lambda ys: jnp.zeros(()), running, 3)
    algorithm = ParticleGibbs(4, num_samples=5, num_warmup=0, num_chains=1, ancestor_sampling=True)
    with pytest.raises(pp.ModelError, match="Markov"):
        pp.infer(program, YS, algorithm=algorithm)


def test_progress_bar_is_an_option_that_changes_neither_the_draws_nor_the_compiled_chain(capsys):
    """``ParticleGibbs`` and ``PMMH`` take ``progress_bar`` like every algorithm; it is handed to the
    MCMC driver, is not part of the kernel's identity (equal kernels, so no recompilation) and never
    changes the draws."""
    from ppinfer import _talk

    def prior(ys):
        pp.sample("a", dist.Uniform(-1.0, 1.0))

    def init(theta, ys):
        return jnp.zeros(())

    def step(x, t, theta, ys):
        x = pp.sample("x", dist.Normal(theta["a"] * x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), ys[t])
        return x

    program = pp.sequential(init, step, 3)
    for make in (
        lambda bar: ParticleGibbs(
            4, num_samples=6, num_warmup=2, num_chains=2, prior=prior, progress_bar=bar
        ),
        lambda bar: pp.PMMH(
            prior, num_particles=8, num_samples=6, num_warmup=2, num_chains=2, progress_bar=bar
        ),
    ):
        assert make(True) == make(False) and hash(make(True)) == hash(make(False))
        quiet = pp.infer(program, YS, algorithm=make(False), key=1)
        capsys.readouterr()
        old = _talk.NOTICE_AFTER_S
        _talk.NOTICE_AFTER_S = 0.0  # announce any compilation
        try:
            shown = pp.infer(program, YS, algorithm=make(True), key=1)
        finally:
            _talk.NOTICE_AFTER_S = old
        err = capsys.readouterr().err
        assert make(True).name in err and "compiled" not in err  # the bar, and no recompilation
        np.testing.assert_array_equal(np.asarray(quiet.chains()["a"]), np.asarray(shown.chains()["a"]))


def test_particle_gibbs_with_a_prior_runs_in_float64(x64):
    """The θ step size was float32 while the chain's carry is float64 under x64: a raw while_loop
    TypeError."""
    prior, program = lgssm_unknown_coefficient(0.5, 1.0, 0.5)
    ys = simulate_lgssm(0, 6, 0.7, 0.5, 1.0, 0.5).astype(np.float64)
    r = pp.infer(
        program, ys, algorithm=ParticleGibbs(8, num_samples=20, num_warmup=5, num_chains=1, prior=prior)
    )
    assert np.asarray(r.samples["a"]).dtype == np.float64 and np.all(np.isfinite(np.asarray(r.samples["a"])))


def test_particle_gibbs_says_which_steps_each_draw_ran():
    """A program that stops: each draw's unrun steps hold zeros, and ``extras["active"]`` (as for
    SMC) says which ran; it was missing, so a zero could not be told from a draw of 0 (hunt 14)."""
    ys = jnp.array([-0.9, 0.8, -0.3, -1.0, -1.5, -0.7])

    def step(x, t, ys):
        x = pp.sample("x", dist.Normal(jnp.where(t == 0, 0.0, 0.8 * x), 0.7))
        pp.observe("y", dist.Normal(x, 0.55), ys[t])
        pp.stop(pp.sample("d", dist.Bernoulli(0.3)) == 1)
        return x

    prog = pp.sequential(lambda ys: jnp.zeros(()), step, num_steps=lambda ys: ys.shape[0])
    alg = ParticleGibbs(10, num_samples=50, num_warmup=10, num_chains=2)
    r = pp.infer(prog, ys, algorithm=alg, key=0)
    active = np.asarray(r.extras["active"])
    assert active.shape == (100, 6) and active.dtype == bool
    assert active[:, 0].all() and not active.all()  # the first step always runs; some draws stop
    assert np.all(active[:, 1:] <= active[:, :-1])  # once stopped, stopped
    assert np.all(np.asarray(r.samples["x"])[~active] == 0)
    stops = np.asarray(r.samples["d"]) == 1
    last = active.sum(1) - 1  # a draw ran up to the step whose d stopped it (or to the end)
    ran_to_end = last == 5
    assert np.all(stops[np.arange(100), last] | ran_to_end)
