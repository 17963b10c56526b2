import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppinfer as pp
from models.classic import sprinkler
from ppinfer.algorithms.enumerate import enumerate_runs
from semantics import check_proposal, denote, measure_of


def test_sprinkler_exact_posterior():
    r = pp.infer(sprinkler(), algorithm=pp.Enumerate())
    # P(rain | wet) by hand: joint masses 0.2·0.01·0.99 + 0.2·0.99·0.8 over the evidence.
    z = 0.8 * 0.4 * 0.9 + 0.2 * 0.99 * 0.8 + 0.2 * 0.01 * 0.99
    assert np.exp(r.log_evidence) == pytest.approx(z, rel=1e-5)
    assert float(r.mean("rain")) == pytest.approx((0.2 * 0.99 * 0.8 + 0.2 * 0.01 * 0.99) / z, rel=1e-5)


def test_control_flow_depending_on_choices():
    def m():
        a = pp.sample("a", dist.Bernoulli(0.3))
        if int(a) == 1:
            pp.sample("b", dist.Categorical(jnp.array([0.5, 0.25, 0.25])))
        return a

    runs = enumerate_runs(m)
    assert len(runs) == 4
    np.testing.assert_allclose(sum(np.exp(r.log_prob) for r in runs), 1.0, rtol=1e-6)


def test_batched_site_enumerates_joint_values():
    def m():
        with pp.plate("p", 3):
            x = pp.sample("x", dist.Bernoulli(0.5))
        pp.condition("two", x.sum() == 2)

    r = pp.infer(m, algorithm=pp.Enumerate())
    assert r.num_particles == 8
    assert np.exp(r.log_evidence) == pytest.approx(3 / 8, rel=1e-5)


def test_proposal_weights_are_valid_exactly(x64):
    def m():
        a = pp.sample("a", dist.Categorical(jnp.array([0.2, 0.5, 0.3])))
        pp.observe("y", dist.Normal(a.astype(float), 1.0), 0.4)

    q = lambda: pp.sample("a", dist.Categorical(jnp.array([0.6, 0.2, 0.2])))
    assert check_proposal(m, (), q) < 1e-12


def test_check_proposal_runs_the_engine(x64, monkeypatch):
    """An engine that drops q from the weight fails: check_proposal ran only the reference
    interpreter, under q and without, and passed it (hunt 17)."""
    import ppinfer.weighted as weighted

    def m(y):
        a = pp.sample("a", dist.Bernoulli(0.3))
        pp.observe("y", dist.Normal(1.0 * a, 1.0), y)

    q = lambda y: pp.sample("a", dist.Bernoulli(0.8))
    assert check_proposal(m, (0.4,), q) < 1e-12
    right = weighted.weight_from_traces
    monkeypatch.setattr(weighted, "weight_from_traces", lambda p, q=None, **kw: right(p, **kw))
    assert check_proposal(m, (0.4,), q) > 0.1


def test_sequential_program_with_stop(x64):
    def init():
        return jnp.zeros((), jnp.int32)

    def step(n, t):
        b = pp.sample("b", dist.Bernoulli(0.5))
        pp.stop(b == 1)
        return n + b

    prog = pp.sequential(init, step, 3)
    r = pp.infer(prog, algorithm=pp.Enumerate())
    # Branches: stop at step 0, 1, 2, or never (b = 0,0,0): masses 1/2, 1/4, 1/8, 1/8.
    assert r.num_particles == 4
    active = np.asarray(r.extras["active"])
    assert sorted(active.sum(1).tolist()) == [1, 2, 3, 3]
    assert measure_of(r).max_abs_diff(denote(prog)) < 1e-12


def test_a_program_that_stops_is_enumerated_batched_like_eagerly(x64):
    """The batched enumeration runs every step of a program that calls ``pp.stop``, a stopped
    particle's later steps dormant (masked, state kept, no branching): the same executions,
    masses, trajectories (dormant steps zero-filled, inactive) and stop flags as one eager
    execution per branch, and the measure ``denote`` gives. Without the dormant mask the later
    steps' choices branch again (81 executions, not 31); without keeping the state, the final
    states differ."""

    def init():
        return jnp.zeros((), jnp.int32)

    def step(n, t):
        c = pp.sample("c", dist.Categorical(jnp.array([0.5, 0.3, 0.2])))
        pp.observe("y", dist.Normal(c.astype(float), 1.0), 0.7)
        pp.deterministic("total", n + c)
        pp.stop(c == 2)
        return n + c + 1  # the state counts the steps taken: a dormant step must not change it

    prog = pp.sequential(init, step, 4)
    batched = pp.infer(prog, algorithm=pp.Enumerate(batched=True))
    eager = pp.infer(prog, algorithm=pp.Enumerate(batched=False))
    assert batched.extras["batched"] and not eager.extras["batched"]
    assert batched.num_particles == eager.num_particles == 1 + 2 * (1 + 2 * (1 + 2 * (1 + 2)))
    np.testing.assert_allclose(np.asarray(batched.log_weights), np.asarray(eager.log_weights), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(batched.extras["active"]), np.asarray(eager.extras["active"]))
    for name in ("c", "total"):
        np.testing.assert_array_equal(np.asarray(batched.samples[name]), np.asarray(eager.samples[name]))
    assert measure_of(batched).max_abs_diff(denote(prog)) < 1e-12
    runs_b = enumerate_runs(prog_fn(prog), batched=True)
    runs_e = enumerate_runs(prog_fn(prog), batched=False)
    assert [sorted(r.choices) for r in runs_b] == [sorted(r.choices) for r in runs_e]
    assert [r.stopped for r in runs_b] == [r.stopped for r in runs_e]
    assert [int(r.value) for r in runs_b] == [int(r.value) for r in runs_e]
    np.testing.assert_allclose([r.log_prob for r in runs_b], [r.log_prob for r in runs_e], rtol=1e-12)


def prog_fn(prog):
    from ppinfer.algorithms.enumerate import _Unrolled

    return _Unrolled(prog)


def test_continuous_choice_is_an_error():
    m = lambda: pp.sample("x", dist.Normal(0, 1))
    with pytest.raises(pp.EnumerationError, match="'x'"):
        pp.infer(m, algorithm=pp.Enumerate())


def test_too_many_branches_is_an_error():
    def m():
        with pp.plate("p", 12):
            pp.sample("x", dist.Bernoulli(0.5))

    with pytest.raises(pp.EnumerationError, match="max_branches"):
        pp.infer(m, algorithm=pp.Enumerate(max_branches=100))


def test_impossible_program_is_an_error():
    def m():
        x = pp.sample("x", dist.Bernoulli(0.5))
        pp.condition("never", x > 1)

    with pytest.raises(pp.ZeroEvidenceError):
        pp.infer(m, algorithm=pp.Enumerate())


@pytest.mark.parametrize("batched", [None, True, False])
def test_a_support_that_depends_on_an_earlier_choice(batched):
    """``DiscreteUniform(0, n + 1)`` after ``n``: NumPyro cannot enumerate it under the batch's
    trace, so the batched paths run eagerly (the default raised an EnumerationError blaming an
    event dimension)."""
    probs = np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.5])

    def model():
        n = pp.sample("n", dist.Categorical(jnp.asarray(probs)))
        a = pp.sample("a", dist.Bernoulli(0.5))
        b = pp.sample("b", dist.Bernoulli(0.5))
        k = pp.sample("k", dist.DiscreteUniform(0, n + 1))
        pp.observe("y", dist.Normal(k + a + b, 1.0), 2.0)

    from scipy.stats import norm as normal

    z = sum(
        probs[n] / (n + 2) * 0.25 * normal.pdf(2.0, k + a + b, 1.0)
        for n in range(6)
        for k in range(n + 2)
        for a in (0, 1)
        for b in (0, 1)
    )
    r = pp.infer(model, algorithm=pp.Enumerate(batched=batched), key=0)
    assert r.log_evidence == pytest.approx(np.log(z), abs=1e-5)
