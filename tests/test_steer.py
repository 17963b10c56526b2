"""Steer (SMC steering, N particles × K extensions): the selection block checked exactly, the whole
algorithm against the exact posterior of token-level programs on a bigram LM (by enumeration)."""

import math
import re

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from bigram_lm import EOS, P, T, init, no_repeat_step
from scipy.special import logsumexp

import ppinfer as pp
from models.lm_programs import regex_init, regex_proposal
from ppinfer.algorithms.steer import Steer, extend, select_from_uniforms
from ppinfer.constraints import regex_automaton
from ppinfer.population import Population
from ppinfer.suspended import Particle
from semantics import Measure, check_unbiased_evidence
from semantics.steer import check_select, select_outcomes, steer_replicates

VOCAB = [b"", b"a", b"b", b"c"]
PATTERN = r"(ab|c)+"
AUTOMATON = regex_automaton(PATTERN, VOCAB, eos_id=EOS)


def free_step(ctx, t, p):
    """No constraint: the LM with a potential rewarding token 3."""
    tok = pp.sample("tok", ctx.next_token())
    pp.factor("likes_c", 0.9 * (tok == 3))
    pp.stop(tok == EOS)
    return ctx.extend(p, tok)


def regex_step(state, t, p, a):
    """``models.lm_programs.regex_step`` for the bigram LM, which has no ``eos_id``: it ends at EOS."""
    ctx, s = state
    tok = pp.sample("tok", ctx.next_token())
    pp.condition("regex", a.allowed(s)[tok])
    pp.stop(tok == EOS)
    return ctx.extend(p, tok), a.advance(s, tok)


PROGRAMS = {
    "condition": (pp.sequential(init, no_repeat_step, T), (P,), None),
    "unconstrained": (pp.sequential(init, free_step, T), (P,), None),
    "regex": (pp.sequential(regex_init, regex_step, T), (P, AUTOMATON), regex_proposal),
}


def sequence_measure(tok, active, log_weights) -> Measure:
    """Unnormalised measure over generated token sequences (each particle's tokens up to its stop);
    ``tok, active: [M, T]``, ``log_weights: f[M]``."""
    tok, active, w = np.asarray(tok), np.asarray(active), np.exp(np.asarray(log_weights, np.float64))
    return Measure((tuple(tok[i][active[i]].tolist()), w[i]) for i in range(len(w)))


def exact(name):
    program, args, _ = PROGRAMS[name]
    r = pp.infer(program, *args, algorithm=pp.Enumerate())
    return sequence_measure(r.samples["tok"], r.extras["active"], r.log_weights), r.log_evidence


# --- the selection block, exactly -------------------------------------------------------------

# Eight children each: one above the threshold for n = 3 and zero weights; ties (everything at the
# threshold); two dominant children; fewer positive weights than slots for n = 3.
WEIGHT_VECTORS = [
    [0.5, 0.1, 0.05, 0.2, 0.15, 0.0, 0.3, 0.0],
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    [5.0, 0.01, 0.02, 0.01, 3.0, 0.02, 0.01, 0.03],
    [0.3, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0, 0.0],
]


@pytest.mark.parametrize("scheme", ["systematic", "stratified"])
def test_select_preserves_the_measure_exactly(scheme):
    with np.errstate(divide="ignore"):
        log_weights = [np.log(np.asarray(w)) for w in WEIGHT_VECTORS]
    for lw in log_weights:
        for n in (1, 3, 8, 10):  # 8: every child kept; 10: more slots than children
            assert check_select(scheme, lw, n) < 1e-12, (lw, n)


def test_systematic_select_keeps_heavy_children_distinct_and_preserves_mass():
    lw = np.log([5.0, 0.01, 0.02, 0.01, 3.0, 0.02, 0.01, 0.03])
    outcomes = select_outcomes("systematic", lw, 4)
    assert math.fsum(p for p, _, _ in outcomes) == pytest.approx(1.0, abs=1e-12)
    for _, indices, new_lw in outcomes:
        assert len(set(indices)) == 4  # without replacement
        assert {0, 4} <= set(indices)  # above the threshold: kept deterministically
        assert logsumexp(new_lw) == pytest.approx(logsumexp(lw), abs=1e-12)  # Ẑ preserved exactly


def test_select_check_detects_a_wrong_weighting():
    def own_weights(scheme, u, lw, n):  # survivors keep their own weight instead of c: biased
        indices, _, kept = select_from_uniforms(scheme, u, lw, n)
        return indices, lw[indices], kept

    lw = np.log([0.5, 0.1, 0.05, 0.2, 0.15, 0.3])
    assert check_select("systematic", lw, 3, own_weights) > 0.05


# --- the whole algorithm against the exact posterior -------------------------------------------

# Single-run TV: at N = 4·10^4 survivors, K = 2 (8·10^4 children per step), the Monte Carlo noise
# alone gives TV = 0.0089 ± 0.0015 on this 40-outcome posterior (8 seeds), so 0.02 is a > 7-sigma
# bound (false-failure rate < 1e-9).
N_TV, K_TV = 40_000, 2


def test_steer_matches_exact_posterior_and_traces_genealogy():
    measure, log_z = exact("condition")
    program, args, _ = PROGRAMS["condition"]
    r = pp.infer(program, *args, algorithm=Steer(N_TV, K_TV), key=0)
    assert r.algorithm == "Steer" and r.log_weights.shape == (N_TV,)
    assert sequence_measure(r.samples["tok"], r.extras["active"], r.log_weights).tv(measure) < 0.02
    assert r.ess.shape == (T,) and r.ancestors.shape == (T, N_TV) and bool(np.all(r.resampled))
    # Genealogy: each survivor's traced trajectory is exactly the token prefix in its final state.
    toks, active = np.asarray(r.samples["tok"]), np.asarray(r.extras["active"])
    state_toks, lengths = np.asarray(r.state.tokens), np.asarray(r.state.length)
    for i in range(0, N_TV, 97):
        np.testing.assert_array_equal(toks[i][active[i]], state_toks[i][: lengths[i]])


# E[Ẑ] = Z and the expected output measure: R independent runs with N = 8, K = 4. The pooled
# measure Σ_r Σ_i w_ri δ(x_ri) is an unbiased estimate of the unnormalised posterior; its TV to the
# exact posterior from Monte Carlo noise alone is 0.0105 ± 0.0014 (condition), 0.0125 ± 0.0018
# (unconstrained) and 0.0059 ± 0.0016 (regex) at R = 4000 (5 seeds each), so 0.03 is a > 9-sigma
# bound. The Ẑ check has a stated false-failure rate of 1e-3 (z over those 15 runs: |z| ≤ 2.4).
R, N_REP, K_REP = 4000, 8, 4


@pytest.mark.parametrize("name", ["condition", "unconstrained", "regex"])
def test_steer_evidence_unbiased_and_pooled_particles_match_posterior(name):
    measure, log_z = exact(name)
    program, args, proposal = PROGRAMS[name]
    out = steer_replicates(program, args, R, N_REP, K_REP, key=1, proposal=proposal)
    assert check_unbiased_evidence(out["log_evidence"], log_z, false_failure_rate=1e-3)
    tok = out["trajectories"]["tok"].reshape(R * N_REP, T)
    active = out["active"].reshape(R * N_REP, T)
    pooled = sequence_measure(tok, active, out["log_weights"].reshape(-1))
    assert pooled.tv(measure) < 0.03
    if name == "regex":  # the locally constrained proposal never produces an impossible particle
        assert np.all(np.isfinite(out["log_weights"]))
        for seq in pooled.mass:
            text = "".join(VOCAB[t].decode() for t in seq)
            if seq and seq[-1] == EOS:
                assert re.fullmatch(PATTERN, text), text


def test_extend_splits_running_particles_and_carries_finished_ones():
    state = jnp.arange(3.0)
    pop = Population(Particle(state, jnp.array([False, True, False])), jnp.log(jnp.array([0.2, 0.5, 0.3])))
    children = extend(pop, 4)
    np.testing.assert_array_equal(np.asarray(children.particles.state), np.repeat([0.0, 1.0, 2.0], 4))
    w = np.exp(np.asarray(children.log_weights))
    np.testing.assert_allclose(w, [0.05] * 4 + [0.5, 0, 0, 0] + [0.075] * 4, rtol=1e-6)
    assert math.fsum(w) == pytest.approx(1.0, rel=1e-6)  # the measure is unchanged


def test_one_extension_keeps_every_child_in_place():
    # K = 1: N children for N slots, selection is the identity (sequential importance sampling).
    lw = jnp.log(jnp.array([0.1, 0.0, 0.6, 0.3]))
    indices, new_lw, kept = select_from_uniforms("systematic", jnp.array([0.7]), lw, 4)
    np.testing.assert_array_equal(np.asarray(indices), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.asarray(new_lw), np.asarray(lw))
    assert int(kept) == 4


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_particles": 0}, "num_particles"),
        ({"num_particles": 2.5}, "num_particles"),
        ({"num_extensions": 0}, "num_extensions"),
        ({"num_extensions": -3}, "num_extensions"),
        ({"num_extensions": True}, "num_extensions"),
        ({"resampling": "multinomial"}, "selection scheme"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(pp.ConfigError, match=match):
        Steer(**kwargs)


def test_static_program_is_a_config_error():
    def model():
        pp.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(pp.ConfigError, match="sequential program"):
        pp.infer(model, algorithm=Steer(4, 2))


def test_all_children_ruled_out_is_a_clear_error():
    def impossible(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())
        pp.condition("nothing", tok > 10)
        return ctx.extend(p, tok)

    with pytest.raises(pp.ZeroEvidenceError, match="after step 0"):
        pp.infer(pp.sequential(init, impossible, T), P, algorithm=Steer(8, 2))
