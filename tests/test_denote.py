"""The reference interpreter behind ``semantics.denote``, checked against measures computed by hand."""

import math

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import ppinfer as pp
from semantics import Measure, denote, measure_of, outcome_key
from semantics.interpret import interpret


def normal_pdf(x, mu, sigma=1.0):
    return math.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def by_hand(masses: dict) -> Measure:
    """A measure from ``{((name, value), …): mass}``."""
    return Measure((outcome_key(dict(k)), m) for k, m in masses.items())


def assert_same(got: Measure, want: Measure, tol: float = 1e-12):
    assert set(got.mass) == set(want.mass)
    assert got.max_abs_diff(want) < tol, (got, want)


# --- static programs ----------------------------------------------------------------------------


def bern_bern():
    a = pp.sample("a", dist.Bernoulli(0.3))
    b = pp.sample("b", dist.Bernoulli(jnp.where(a == 1, 0.9, 0.2)))
    pp.observe("y", dist.Bernoulli(jnp.where(b == 1, 0.7, 0.1)), 1)


def test_bernoulli_bernoulli_with_an_observation():
    want = by_hand(
        {
            (("a", 0), ("b", 0)): 0.7 * 0.8 * 0.1,
            (("a", 0), ("b", 1)): 0.7 * 0.2 * 0.7,
            (("a", 1), ("b", 0)): 0.3 * 0.1 * 0.1,
            (("a", 1), ("b", 1)): 0.3 * 0.9 * 0.7,
        }
    )
    got = denote(bern_bern)
    assert_same(got, want)
    assert got.total() == pytest.approx(0.056 + 0.098 + 0.003 + 0.189, abs=1e-15)


def test_condition_drops_the_excluded_outcomes():
    def m():
        a = pp.sample("a", dist.Categorical(jnp.array([0.2, 0.5, 0.3])))
        b = pp.sample("b", dist.Bernoulli(0.6))
        pp.condition("big", a + b >= 2)

    want = by_hand(
        {
            (("a", 1), ("b", 1)): 0.5 * 0.6,
            (("a", 2), ("b", 0)): 0.3 * 0.4,
            (("a", 2), ("b", 1)): 0.3 * 0.6,
        }
    )
    assert_same(denote(m), want)


def test_factor_multiplies_the_mass():
    def m():
        x = pp.sample("x", dist.Bernoulli(0.4))
        numpyro.factor("f", x * math.log(3.0))
        pp.factor("g", -0.5)

    g = math.exp(-0.5)
    assert_same(denote(m), by_hand({(("x", 0),): 0.6 * g, (("x", 1),): 0.4 * 3.0 * g}))


def test_categorical_and_a_plate_of_two_bernoullis():
    probs_c, probs_z = [0.5, 0.3, 0.2], [0.1, 0.6]

    def m(y):
        c = pp.sample("c", dist.Categorical(jnp.array(probs_c)))
        with pp.plate("p", 2):
            z = pp.sample("z", dist.Bernoulli(jnp.array(probs_z)))
        s = pp.deterministic("s", c + z.sum())
        pp.observe("y", dist.Normal(s.astype(float), 1.0), y)

    y = 1.5
    masses = {}
    for c in range(3):
        for z0 in (0, 1):
            for z1 in (0, 1):
                p = probs_c[c]
                p *= probs_z[0] if z0 else 1 - probs_z[0]
                p *= probs_z[1] if z1 else 1 - probs_z[1]
                s = c + z0 + z1
                masses[(("c", c), ("z", (z0, z1)), ("s", s))] = p * normal_pdf(y, s)
    got = denote(m, y)
    assert len(got.mass) == 12
    assert_same(got, by_hand(masses))


def test_zero_probability_values_are_never_taken():
    def m():
        pp.sample("a", dist.Categorical(jnp.array([0.0, 0.25, 0.75])))

    assert_same(denote(m), by_hand({(("a", 1),): 0.25, (("a", 2),): 0.75}))


def test_a_dead_path_is_not_expanded():
    reached = []

    def m():
        a = pp.sample("a", dist.Bernoulli(0.5))
        pp.condition("is_one", a == 1)
        reached.append(int(a))
        with pp.plate("p", 6):
            pp.sample("z", dist.Bernoulli(0.5))

    # 1 execution for a = 0 (abandoned at the condition) + 2^6 for a = 1; 128 without pruning.
    got = interpret(m, max_paths=65)
    assert set(reached) == {1}
    assert len(got.mass) == 64
    assert got.total() == pytest.approx(0.5, abs=1e-15)


def test_mask_and_scale_follow_numpyro():
    def m():
        x = pp.sample("x", dist.Bernoulli(0.5))
        with handlers.scale(scale=2.0):
            pp.observe("y", dist.Normal(x.astype(float), 1.0), 0.3)
        with handlers.mask(mask=False):
            pp.observe("ignored", dist.Normal(0.0, 1.0), 100.0)
        with pp.plate("p", 2), handlers.mask(mask=jnp.array([True, False])):
            pp.observe("half", dist.Bernoulli(0.25), jnp.array([1, 1]))

    want = {(("x", x),): 0.5 * normal_pdf(0.3, x) ** 2 * 0.25 for x in (0, 1)}
    assert_same(denote(m), by_hand(want))


def test_valid_proposal_gives_the_denotation_and_an_invalid_one_does_not():
    prior = [0.2, 0.5, 0.3]

    def m():
        a = pp.sample("a", dist.Categorical(jnp.array(prior)))
        pp.observe("y", dist.Normal(a.astype(float), 1.0), 0.4)
        pp.sample("b", dist.Bernoulli(0.5))

    want = by_hand(
        {(("a", a), ("b", b)): prior[a] * normal_pdf(0.4, a) * 0.5 for a in range(3) for b in (0, 1)}
    )
    q = lambda: pp.sample("a", dist.Categorical(jnp.array([0.6, 0.2, 0.2])))
    assert_same(denote(m), want)
    assert_same(denote(m, proposal=q), want)
    # A proposal that never proposes a = 2 loses that mass.
    bad = lambda: pp.sample("a", dist.Categorical(jnp.array([0.5, 0.5, 0.0])))
    got = denote(m, proposal=bad)
    assert got.max_abs_diff(want) == pytest.approx(prior[2] * normal_pdf(0.4, 2) * 0.5, abs=1e-15)


def test_proposal_of_an_observed_site_is_an_error():
    q = lambda: pp.sample("y", dist.Bernoulli(0.5))
    with pytest.raises(ValueError, match="observes"):
        denote(bern_bern, proposal=q)


def test_continuous_latent_site_is_an_error():
    def m():
        pp.sample("a", dist.Bernoulli(0.5))
        pp.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(pp.EnumerationError, match="'x'"):
        denote(m)


def test_path_budget():
    def m():
        with pp.plate("p", 12):
            pp.sample("x", dist.Bernoulli(0.5))

    with pytest.raises(pp.EnumerationError, match="max_paths"):
        interpret(m, max_paths=100)

    def chain():
        for i in range(8):
            pp.sample(f"x{i}", dist.Bernoulli(0.5))

    with pytest.raises(pp.EnumerationError, match="max_paths"):
        interpret(chain, max_paths=100)
    assert len(interpret(chain, max_paths=256).mass) == 256


# --- sequential programs ------------------------------------------------------------------------

PI = np.array([0.6, 0.4])
T = np.array([[0.7, 0.3], [0.2, 0.8]])
MEANS = np.array([-1.0, 1.0])
P_GO = 0.8


def hmm_with_stops():
    """init: ``go ~ Bernoulli(0.8)``, stop at once if 0; step t: ``x_t ~ Cat(π or T[x_{t−1}])``,
    ``y_t ~ N(means[x_t], 1)``, stop after a step where ``x_t = 1``."""

    def init(ys):
        go = pp.sample("go", dist.Bernoulli(P_GO))
        pp.stop(go == 0)
        return jnp.zeros((), jnp.int32)

    def step(x, t, ys):
        probs = jnp.where(t == 0, jnp.asarray(PI), jnp.asarray(T)[x])
        x = pp.sample("x", dist.Categorical(probs))
        pp.observe("y", dist.Normal(jnp.asarray(MEANS)[x], 1.0), ys[t])
        pp.stop(x == 1)
        return x.astype(jnp.int32)

    return pp.sequential(init, step, num_steps=lambda ys: ys.shape[0])


def test_sequential_hmm_with_stop_by_the_forward_recursion():
    ys = np.array([0.3, -0.8])
    lik = np.array([[normal_pdf(y, m) for m in MEANS] for y in ys])  # [t, x]
    alpha0 = P_GO * PI * lik[0]  # mass of (go = 1, x_0)
    alpha1 = (alpha0 * np.array([1.0, 0.0])) @ T * lik[1]  # x_0 = 1 stopped the particle
    z = (1 - P_GO) + alpha0[1] + alpha1.sum()
    want = by_hand(
        {
            (("init/go", 0),): 1 - P_GO,
            (("init/go", 1), ("0/x", 1)): alpha0[1],
            (("init/go", 1), ("0/x", 0), ("1/x", 0)): alpha1[0],
            (("init/go", 1), ("0/x", 0), ("1/x", 1)): alpha1[1],
        }
    )
    got = denote(hmm_with_stops(), ys)
    assert_same(got, want)
    assert got.total() == pytest.approx(z, rel=1e-13)


def test_sequential_step_proposal_gives_the_denotation():
    ys = np.array([0.3, -0.8, 0.5])
    q = lambda x, t, ys: pp.sample("x", dist.Categorical(jnp.array([0.3, 0.7])))
    prog = hmm_with_stops()
    assert denote(prog, ys, proposal=q).max_abs_diff(denote(prog, ys)) < 1e-15


# --- the Enumerate algorithm agrees with the reference --------------------------------------------


@pytest.mark.parametrize("name", ["bern_bern", "plate", "hmm"])
def test_enumerate_agrees_with_the_reference(x64, name):
    def plate_model():
        c = pp.sample("c", dist.Categorical(jnp.array([0.5, 0.3, 0.2])))
        with pp.plate("p", 2):
            z = pp.sample("z", dist.Bernoulli(jnp.array([0.1, 0.6])))
        pp.condition("ok", c + z.sum() != 2)

    program, args = {
        "bern_bern": (bern_bern, ()),
        "plate": (plate_model, ()),
        "hmm": (hmm_with_stops(), (np.array([0.3, -0.8, 0.5]),)),
    }[name]
    r = pp.infer(program, *args, algorithm=pp.Enumerate())
    want = denote(program, *args)
    assert measure_of(r).max_abs_diff(want) < 1e-12
    assert math.exp(r.log_evidence) == pytest.approx(want.total(), rel=1e-12)
