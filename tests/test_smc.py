import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppinfer as pp
from models.classic import discrete_hmm, lgssm, simulate_hmm, simulate_lgssm
from ppinfer.resample import SCHEMES
from semantics import hmm_forward, kalman_filter

HMM = dict(
    init_probs=[0.5, 0.3, 0.2],
    transition=[[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
    means=[-2.0, 0.0, 2.0],
    scale=1.0,
)
LG = dict(a=0.9, q=0.5, c=1.0, r=1.0)


def hmm_exact(ys):
    ll = np.stack([-0.5 * (ys - m) ** 2 - 0.5 * np.log(2 * np.pi) for m in HMM["means"]], axis=1)
    return hmm_forward(HMM["init_probs"], HMM["transition"], ll)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_hmm_filtering_and_evidence(scheme):
    ys = simulate_hmm(0, 25, **HMM)
    log_z, filt = hmm_exact(ys.astype(np.float64))
    prog = discrete_hmm(**HMM)
    r = pp.infer(prog, ys, algorithm=pp.SMC(4000, resampling=scheme), key=0)
    last = np.asarray(r.samples["x"][:, -1])
    w = np.asarray(r.weights)
    est = np.array([w[last == k].sum() for k in range(3)])
    np.testing.assert_allclose(est, filt[-1], atol=0.03)
    # sd of log Ẑ here is 0.09 (measured over 200 seeds): 0.35 is a 4-sigma bound.
    assert r.log_evidence == pytest.approx(log_z, abs=0.35)


def test_lgssm_against_kalman():
    ys = simulate_lgssm(1, 50, **LG)
    log_z, means, variances = kalman_filter(LG["a"], LG["q"], LG["c"], LG["r"], 0.0, 1.0, ys)
    r = pp.infer(lgssm(**LG), ys, algorithm=pp.SMC(5000), key=2)
    # sd of log Ẑ here is 0.07 (measured over 100 seeds): 0.3 is a 4-sigma bound.
    assert r.log_evidence == pytest.approx(log_z, abs=0.3)
    final = r.state
    m = float(jnp.sum(r.weights * final))
    assert m == pytest.approx(means[-1], abs=0.05)
    assert float(r.mean("x")[-1]) == pytest.approx(means[-1], abs=0.05)
    assert r.samples["x"].shape == (5000, 50)
    np.testing.assert_array_equal(r.samples["x"][:, -1], final)


def test_genealogy_traces_particles_back():
    ys = simulate_lgssm(1, 10, **LG)
    r = pp.infer(lgssm(**LG), ys, algorithm=pp.SMC(50, ess_threshold=1.0), key=0)
    assert bool(np.all(np.asarray(r.resampled)[:-1])) and not bool(r.resampled[-1])
    # The trajectory of each final particle ends in its own final state.
    np.testing.assert_array_equal(r.samples["x"][:, -1], r.state)
    assert r.ancestors.shape == (10, 50)
    assert r.ess.shape == (10,) and r.log_evidence_history.shape == (10,)
    assert r.log_evidence_history[-1] == pytest.approx(r.log_evidence, abs=1e-4)


def test_threshold_zero_never_resamples_and_one_always():
    ys = simulate_lgssm(1, 8, **LG)
    r0 = pp.infer(lgssm(**LG), ys, algorithm=pp.SMC(64, ess_threshold=0.0), key=0)
    r1 = pp.infer(lgssm(**LG), ys, algorithm=pp.SMC(64, ess_threshold=1.0), key=0)
    assert not np.any(np.asarray(r0.resampled))
    assert np.all(np.asarray(r1.resampled)[:-1])


def test_step_proposal_is_weighted_correctly():
    # Locally optimal proposal for the LGSSM: q(x_t | x_{t-1}, y_t) — with precise observations
    # (r = 0.05) the bootstrap filter degenerates and this one does not; same answer.
    a, q, c, r_ = LG["a"], LG["q"], LG["c"], 0.05
    model = lgssm(a, q, c, r_)

    def proposal(x, t, ys):
        prior_m = jnp.where(t == 0, 0.0, a * x)
        prior_v = jnp.where(t == 0, 1.0, q)
        v = 1.0 / (1.0 / prior_v + c * c / r_)
        m = v * (prior_m / prior_v + c * ys[t] / r_)
        pp.sample("x", dist.Normal(m, jnp.sqrt(v)))

    ys = simulate_lgssm(3, 30, a, q, c, r_)
    log_z, means, _ = kalman_filter(a, q, c, r_, 0.0, 1.0, ys)
    boot = pp.infer(model, ys, algorithm=pp.SMC(500), key=0)
    opt = pp.infer(model, ys, algorithm=pp.SMC(500, proposal=proposal), key=0)
    assert float(jnp.mean(opt.ess)) > 2 * float(jnp.mean(boot.ess))
    # sd of log Ẑ: 0.075 with this proposal, 0.61 bootstrap (400 seeds); 4-sigma bound.
    assert opt.log_evidence == pytest.approx(log_z, abs=0.3)


def test_stop_freezes_particles():
    def init():
        return jnp.zeros((), jnp.int32)

    def step(n, t):
        b = pp.sample("b", dist.Bernoulli(0.5))
        pp.stop(b == 1)
        return n + 1

    r = pp.infer(pp.sequential(init, step, 6), algorithm=pp.SMC(2000, ess_threshold=0.0), key=0)
    n = np.asarray(r.state)
    active = np.asarray(r.extras["active"])
    np.testing.assert_array_equal(n, active.sum(1))
    # A particle stops after the first step where b = 1: P(n = k) = 2^-k for k < 6.
    assert np.mean(n == 1) == pytest.approx(0.5, abs=0.04)
    assert np.mean(n == 6) == pytest.approx(2.0**-5, abs=0.02)


def test_dead_particles_are_dropped_not_fatal():
    def init():
        return jnp.zeros(())

    def step(x, t):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.condition("positive", x > 0)
        return x

    r = pp.infer(pp.sequential(init, step, 5), algorithm=pp.SMC(1000, ess_threshold=1.0), key=0)
    assert np.isfinite(r.log_evidence)
    xs = np.asarray(r.samples["x"])
    w = np.asarray(r.weights)
    assert np.all(xs[w > 0] > 0)


def test_compiled_once_for_new_data_of_same_shape():
    traces = {"n": 0}
    base = lgssm(**LG)

    def step(x, t, ys):
        traces["n"] += 1
        return base.step(x, t, ys)

    prog = pp.sequential(base.init, step, lambda ys: ys.shape[0])
    pp.infer(prog, simulate_lgssm(0, 10, **LG), algorithm=pp.SMC(64), key=0)
    first = traces["n"]
    r = pp.infer(prog, simulate_lgssm(1, 10, **LG), algorithm=pp.SMC(64), key=1)
    assert traces["n"] == first
    assert np.isfinite(r.log_evidence)


def test_smc_is_deterministic_given_key():
    ys = simulate_lgssm(0, 10, **LG)
    a = pp.infer(lgssm(**LG), ys, algorithm=pp.SMC(64), key=5)
    b = pp.infer(lgssm(**LG), ys, algorithm=pp.SMC(64), key=jax.random.PRNGKey(5))
    np.testing.assert_array_equal(a.log_weights, b.log_weights)


def test_start_advance_finish_blocks():
    from ppinfer.suspended import advance, finish, start

    ys = jnp.asarray(simulate_lgssm(2, 6, **LG))
    prog = lgssm(**LG)
    key = jax.random.PRNGKey(0)
    seq, info = start(key, prog, (ys,), 8)
    np.testing.assert_allclose(seq.population.log_weights, -np.log(8), rtol=1e-6)
    seq1, step = advance(key, seq, prog, (ys,))
    assert int(seq1.t) == 1 and step.choices["x"].shape == (8,)
    np.testing.assert_allclose(
        seq1.population.log_weights, seq.population.log_weights + step.log_increments, rtol=1e-6
    )
    done = finish(key, seq1, prog, (ys,), 6)
    assert int(done.t) == 6
    # finish is valid: E[Ẑ] = Z over vmapped replications (CLT bound, false-failure rate 1e-3).
    from semantics import check_unbiased_evidence

    def log_z(k):
        s, _ = start(k, prog, (ys,), 16)
        return pp.log_evidence(finish(k, s, prog, (ys,), 6).population.log_weights)

    lz = jax.jit(jax.vmap(log_z))(jax.random.split(key, 2000))
    exact = kalman_filter(LG["a"], LG["q"], LG["c"], LG["r"], 0.0, 1.0, np.asarray(ys))[0]
    assert check_unbiased_evidence(np.asarray(lz), exact)


def test_smc_batch_equals_individual_runs():
    """Run b of smc_batch is pp.infer's run on dataset b with key split(key, B)[b]; a second batch
    of the same shapes reuses the compiled runs."""
    from ppinfer import _compile
    from ppinfer.algorithms.smc import smc_batch

    datasets = np.stack([simulate_lgssm(s, 12, **LG) for s in range(3)])
    prog = lgssm(**LG)
    cfg = pp.SMC(128)
    key = jax.random.PRNGKey(9)
    out = smc_batch(key, prog, (datasets,), cfg)
    assert out["log_evidence"].shape == (3,)
    for b, k in enumerate(jax.random.split(key, 3)):
        single = pp.infer(prog, datasets[b], algorithm=cfg, key=k)
        np.testing.assert_allclose(out["log_evidence"][b], single.log_evidence, rtol=1e-5)
        np.testing.assert_allclose(out["log_weights"][b], single.log_weights, rtol=1e-5, atol=1e-5)
        exact = kalman_filter(LG["a"], LG["q"], LG["c"], LG["r"], 0.0, 1.0, datasets[b])[0]
        assert float(out["log_evidence"][b]) == pytest.approx(exact, abs=1.0)
    batch_entries = lambda: [f for k, f in _compile._CACHE.items() if k[0] == "smc_batch"]
    (compiled,) = batch_entries()
    again = smc_batch(jax.random.PRNGKey(10), prog, (datasets + 1.0,), cfg)
    assert batch_entries() == [compiled] and len(compiled._compiled) == 1  # one compilation, reused
    assert np.all(np.isfinite(np.asarray(again["log_evidence"])))
    # An int seed, as pp.infer takes (a raw "invalid PRNG key" TypeError before).
    seeded = smc_batch(9, prog, (datasets,), cfg)
    np.testing.assert_array_equal(
        seeded["log_evidence"], smc_batch(jax.random.key(9), prog, (datasets,), cfg)["log_evidence"]
    )
    with pytest.raises(pp.ConfigError, match="more than once"):  # B not a multiple: test_sharding
        smc_batch(9, prog, (datasets,), cfg, devices=(jax.devices()[0],) * 2)


def test_smc_batch_shares_shared_args_and_refuses_mismatched_batches():
    from ppinfer.algorithms.smc import smc_batch

    def init(ys, scale):
        return jnp.zeros(())

    def step(x, t, ys, scale):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.observe("y", dist.Normal(x, scale[t]), ys[t])
        return x

    prog = pp.sequential(init, step, lambda ys, scale: ys.shape[0])
    datasets = np.zeros((2, 4), np.float32)
    datasets[1] += 3.0
    scale = np.ones(4, np.float32)  # one per step, NOT one per run: shared, never sliced
    key = jax.random.PRNGKey(3)
    out = smc_batch(key, prog, (datasets,), pp.SMC(64), shared_args=(scale,))
    assert out["log_evidence"].shape == (2,)
    # Run 0 (all-zero data) is far more likely than run 1 (data at 3) under a random walk from 0.
    assert float(out["log_evidence"][0]) > float(out["log_evidence"][1]) + 3.0
    with pytest.raises(pp.ConfigError, match="different leading"):
        smc_batch(key, prog, (datasets, np.ones((3, 4), np.float32)), pp.SMC(64))


def test_can_stop_sees_stop_in_init_or_step():
    from ppinfer.suspended import can_stop

    plain = lgssm(**LG)
    ys = np.zeros(3, np.float32)
    assert not can_stop(plain, (ys,))

    def step_stops(x, t, ys):
        x = plain.step(x, t, ys)
        pp.stop(x > 10.0)
        return x

    def init_stops(ys):
        pp.stop(False)
        return plain.init(ys)

    assert can_stop(pp.sequential(plain.init, step_stops, 3), (ys,))
    assert can_stop(pp.sequential(init_stops, plain.step, 3), (ys,))


def test_unstoppable_fast_path_equals_masked_path():
    """A program that cannot stop skips the finished-particle masks and the exit test; adding a
    stop that never fires (it consumes no randomness) takes the masked path: same key, same run."""
    plain = lgssm(**LG)

    def step(x, t, ys):
        x = plain.step(x, t, ys)
        pp.stop(jnp.zeros((), bool))
        return x

    masked = pp.sequential(plain.init, step, plain.num_steps)
    ys = simulate_lgssm(3, 30, **LG)
    a = pp.infer(plain, ys, algorithm=pp.SMC(300), key=7)
    b = pp.infer(masked, ys, algorithm=pp.SMC(300), key=7)
    assert a.log_evidence == pytest.approx(b.log_evidence, rel=1e-6)
    np.testing.assert_allclose(a.samples["x"], b.samples["x"], rtol=1e-6)
    np.testing.assert_array_equal(a.resampled, b.resampled)
    np.testing.assert_array_equal(np.asarray(a.extras["active"]), np.asarray(b.extras["active"]))


def _stopping_program():
    def init():
        return pp.sample("z", dist.Normal(0.0, 1.0))

    def step(x, t):
        x = pp.sample("x", dist.Normal(0.8 * x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), 0.5)
        pp.stop(x > 1.5)
        return x

    return pp.sequential(init, step, 12)


@pytest.mark.parametrize("stops", [False, True])
def test_history_false_is_the_same_filter_without_records(stops):
    """``history=False`` draws the same random stream: the same weights and log Ẑ, init's choices
    carried through resampling equal the genealogy-traced ones, and the final choices are each
    particle's latest (last active step's) choices; no genealogy is kept."""
    from ppinfer.plots import lineages

    if stops:
        prog, args = _stopping_program(), ()
    else:
        prog, args = lgssm(**LG), (simulate_lgssm(4, 20, **LG),)
    full = pp.infer(prog, *args, algorithm=pp.SMC(200), key=11)
    filt = pp.infer(prog, *args, algorithm=pp.SMC(200, history=False), key=11)
    assert filt.log_evidence == pytest.approx(full.log_evidence, rel=1e-6)
    np.testing.assert_allclose(filt.log_weights, full.log_weights, rtol=1e-6)
    np.testing.assert_array_equal(filt.resampled, full.resampled)
    x_full, x_filt = np.asarray(full.samples["x"]), np.asarray(filt.samples["x"])
    active = np.asarray(full.extras["active"])
    last = active.shape[1] - 1 - np.argmax(active[:, ::-1], axis=1)
    if stops:
        assert (last < active.shape[1] - 1).any()  # some particles did stop early
        np.testing.assert_allclose(filt.samples["z"], full.samples["z"], rtol=1e-6)
    np.testing.assert_allclose(x_filt, x_full[np.arange(len(last)), last], rtol=1e-6)
    assert filt.ancestors is None
    if stops:  # whether each particle ran a step at all: here every one did (none stops in init)
        np.testing.assert_array_equal(filt.extras["active"], active.any(axis=1))
    else:
        assert filt.extras["active"] is None
    with pytest.raises(pp.errors.ConfigError, match="history=True"):
        lineages(filt)


def test_filtering_means_at_every_step_match_the_kalman_filter():
    # One SMC run gives every step's filtering mean; against the exact Kalman filter means with a
    # 4.5-sigma bound per step from the filter's own ESS (false-failure rate < 1e-4 over 15 steps).
    from models.classic import lgssm, simulate_lgssm
    from semantics import kalman_filter

    ys = simulate_lgssm(2, 15, 0.9, 0.5, 1.0, 1.0)
    result = pp.infer(lgssm(0.9, 0.5, 1.0, 1.0), ys, algorithm=pp.SMC(20000), key=1)
    means = np.asarray(result.filtering_mean("x"))
    _, exact, variances = kalman_filter(0.9, 0.5, 1.0, 1.0, 0.0, 1.0, np.asarray(ys, np.float64))
    ess = np.asarray(result.ess)
    assert means.shape == (15,)
    assert np.all(np.abs(means - exact) < 4.5 * np.sqrt(variances / ess)), means - exact
    # The last step's filtering mean is the plain weighted mean of the final particles' last values.
    last = float(result.expectation(lambda s: s["x"][-1]))
    assert means[-1] == pytest.approx(last, rel=1e-4, abs=1e-5)
    with pytest.raises(pp.ConfigError, match="history"):
        pp.infer(lgssm(0.9, 0.5, 1.0, 1.0), ys, algorithm=pp.SMC(64, history=False)).filtering_mean("x")


def test_a_step_a_particle_did_not_run_records_zeros_as_enumerate_does():
    # Finished particles still draw at later steps (the step is vmapped) and those draws were
    # recorded: Result.mean averaged them in, so SMC, Steer and Importance disagreed with Enumerate
    # (E[x_1 · 1{step 1 ran}] = 0.25 here; SMC gave 0.49).
    def step(s, t):
        x = pp.sample("x", dist.Bernoulli(0.5))
        pp.stop(x == 0)
        return x

    program = pp.sequential(lambda: jnp.zeros((), jnp.int32), step, 2)
    np.testing.assert_allclose(pp.infer(program, algorithm=pp.Enumerate()).mean("x"), [0.5, 0.25])
    for algorithm in (pp.SMC(4000), pp.Steer(1000, 4), pp.Importance(4000)):
        r = pp.infer(program, algorithm=algorithm, key=0)
        ran = np.asarray(r.extras["active"])
        assert not ran.all() and np.all(np.asarray(r.samples["x"])[~ran] == 0)
        # sd of each mean ≤ 0.5/sqrt(1000): 0.06 is over 3.5 sd (false-failure rate < 1e-3).
        np.testing.assert_allclose(r.mean("x"), [0.5, 0.25], atol=0.06)
