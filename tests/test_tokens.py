"""Token-level programs on an exact bigram LM: SMC against the exact posterior by enumeration."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bigram_lm import EOS, LM, PROBS, P, T, init, no_repeat_step

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.constraints import regex_automaton
from ppinfer.lm import NGramLM
from semantics import Measure, check_unbiased_evidence, smc_log_evidence_replicates


def allowed_mask(ctx):
    prev = jnp.where(ctx.length > 0, ctx.tokens[jnp.maximum(ctx.length - 1, 0)], -1)
    v = jnp.arange(4)
    return (v != prev) | (v == EOS)


def locally_constrained(ctx, t, p):
    pp.sample("tok", tk.masked_next_token(ctx, allowed_mask(ctx)))


# TV checks: the bound is TV < 0.02 at N = 10^4; on this 40-outcome posterior the Monte Carlo
# noise alone gives TV ≈ 0.021 ± 0.004 at N = 10^4 (8 seeds), so we run N = 4·10^4, where it is
# 0.010 ± 0.0015 (8 seeds): 0.02 is a > 6-sigma bound (false-failure rate < 1e-6 per check).
N_TV = 40_000


def tempered(ctx, t, p):
    """A tempered-LM proposal (temperature 1.6): weighted by p/q like any proposal."""
    pp.sample("tok", ctx.next_token(temperature=1.6))


def sequence_measure(result) -> Measure:
    """Normalised measure over generated token sequences (up to each particle's stop)."""
    toks = np.asarray(result.samples["tok"])
    active = np.asarray(result.extras["active"])
    w = np.asarray(result.weights, np.float64)
    return Measure((tuple(toks[i][active[i]].tolist()), w[i]) for i in range(len(w))).normalized()


@pytest.fixture(scope="module")
def exact():
    result = pp.infer(pp.sequential(init, no_repeat_step, T), P, algorithm=pp.Enumerate())
    return sequence_measure(result), result.log_evidence


@pytest.mark.parametrize(
    "proposal", [None, locally_constrained, tempered], ids=["bootstrap", "constrained", "tempered"]
)
def test_smc_matches_exact_posterior(exact, proposal):
    measure, _ = exact
    prog = pp.sequential(init, no_repeat_step, T)
    r = pp.infer(prog, P, algorithm=pp.SMC(N_TV, proposal=proposal), key=0)
    assert sequence_measure(r).tv(measure) < 0.02


@pytest.mark.parametrize(
    "proposal", [None, locally_constrained, tempered], ids=["bootstrap", "constrained", "tempered"]
)
def test_evidence_unbiased(exact, proposal):
    _, log_z = exact
    prog = pp.sequential(init, no_repeat_step, T)
    lz = smc_log_evidence_replicates(prog, (P,), 2000, 16, proposal=proposal)
    assert check_unbiased_evidence(lz, log_z)


def test_constrained_proposal_has_no_dead_particles():
    prog = pp.sequential(init, no_repeat_step, T)
    r = pp.infer(prog, P, algorithm=pp.SMC(500, proposal=locally_constrained, ess_threshold=0.0), key=1)
    assert np.all(np.isfinite(np.asarray(r.log_weights)))


def twisted_step(state, t, p):
    """The same target as no_repeat_step, with a twist: ψ = log of the mass the next token can
    take (a one-step lookahead), applied and removed so the target is unchanged."""
    ctx, psi = state
    tok = pp.sample("tok", ctx.next_token())
    prev = jnp.where(ctx.length > 0, ctx.tokens[jnp.maximum(ctx.length - 1, 0)], -1)
    pp.condition("no_repeat", (tok != prev) | (tok == EOS))
    pp.factor("likes_b", 0.7 * (tok == 2))
    pp.stop(tok == EOS)
    new = ctx.extend(p, tok)
    mask = (jnp.arange(4) != tok) | (jnp.arange(4) == EOS)
    lookahead = jax.scipy.special.logsumexp(jnp.where(mask, new.logp, -jnp.inf))
    final = (tok == EOS) | (t == T - 1)
    psi = tk.twist("twist", lookahead, psi, final=final)
    return new, psi


def test_twisted_smc_same_target(exact):
    measure, log_z = exact
    prog = pp.sequential(lambda p: (tk.Context.start(p), jnp.zeros(())), twisted_step, T)
    r = pp.infer(prog, P, algorithm=pp.SMC(N_TV), key=2)
    assert sequence_measure(r).tv(measure) < 0.02
    lz = smc_log_evidence_replicates(prog, (P,), 2000, 16)
    assert check_unbiased_evidence(lz, log_z)
    exact_twisted = pp.infer(prog, P, algorithm=pp.Enumerate())
    assert exact_twisted.log_evidence == pytest.approx(log_z, abs=1e-5)


def test_two_contexts_product_of_experts():
    # Sample from LM1 and weight by LM2's probability: target ∝ p1(x) p2(x) (two LM contexts).
    lm2 = NGramLM.from_probs(
        PROBS[:, ::-1][[0, 3, 2, 1]] / PROBS[:, ::-1][[0, 3, 2, 1]].sum(-1, keepdims=True)
    )
    p2 = tk.prompt(lm2, [EOS], T)

    def init2(p, q):
        return tk.Context.start(p), tk.Context.start(q)

    def step2(state, t, p, q):
        c1, c2 = state
        tok = pp.sample("tok", c1.next_token())
        pp.factor("expert", c2.logp[tok])
        pp.stop(tok == EOS)
        return c1.extend(p, tok), c2.extend(q, tok)

    prog = pp.sequential(init2, step2, T)
    exact = pp.infer(prog, P, p2, algorithm=pp.Enumerate())
    r = pp.infer(prog, P, p2, algorithm=pp.SMC(N_TV), key=3)
    assert sequence_measure(r).tv(sequence_measure(exact)) < 0.02


def test_regex_automaton_mask_and_advance():
    vocab = [b"<eos>", b"a", b"b", b"ab", b"c", b"\xc3"]
    auto = regex_automaton(r"(ab)+", vocab, eos_id=0)
    s = auto.initial
    np.testing.assert_array_equal(auto.allowed(s), [False, True, False, True, False, False])
    s1 = auto.advance(s, 1)  # "a": need "b" next
    np.testing.assert_array_equal(auto.allowed(s1), [False, False, True, False, False, False])
    s2 = auto.advance(s1, 2)  # "ab": complete, EOS allowed, "a"/"ab" continue
    assert bool(auto.accepts(s2))
    np.testing.assert_array_equal(auto.allowed(s2), [True, True, False, True, False, False])
    assert int(auto.advance(s2, 0)) == int(s2)


def test_bad_regex_is_a_config_error():
    with pytest.raises(pp.ConfigError, match="regular expression"):
        regex_automaton("(unclosed", [b"a"], None)


def test_bad_prompt_settings():
    with pytest.raises(pp.ConfigError, match="max_new_tokens"):
        tk.prompt(LM, [EOS], 0)
    with pytest.raises(pp.ModelError, match="at least one token"):
        tk.prompt(LM, [], 3)
    with pytest.raises(pp.DataError, match=r"1-D sequence of token ids, got shape \(1, 2\)"):
        tk.prompt(LM, [[1, 2]], 3)


def test_all_particles_ruled_out_is_a_clear_error():
    def impossible(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())
        pp.condition("nothing", tok > 10)
        return ctx.extend(p, tok)

    with pytest.raises(pp.ZeroEvidenceError, match="after step 0"):
        pp.infer(pp.sequential(init, impossible, T), P, algorithm=pp.SMC(64))


def test_a_program_longer_than_its_context_is_an_error():
    """More steps than ``max_new_tokens``: the context's last slot and the LM cache were overwritten
    and the run returned silently (a final logp 3 nats off a prefill of the sampled tokens)."""

    def step(ctx, t, p):
        return ctx.extend(p, pp.sample("tok", ctx.next_token()))

    short = tk.prompt(LM, [EOS], 3)
    with pytest.raises(pp.InferenceError, match="appended 5 tokens to a context that holds max_new_tokens=3"):
        pp.infer(pp.sequential(tk.Context.start, step, 5), short, algorithm=pp.SMC(8))
    exact_fit = pp.infer(pp.sequential(tk.Context.start, step, 3), short, algorithm=pp.SMC(8))
    assert np.all(np.asarray(exact_fit.state.length) == 3)


def test_regex_automaton_is_the_same_in_every_process():
    """interegular numbers DFA states in set-iteration order, which follows Python's hash seed; the
    automaton's states are renumbered canonically, so the table (hence twist features and random
    streams) does not change between processes. Hash seeds 0 and 3 number ``(a|c)*b`` differently
    inside interegular."""
    import subprocess
    import sys

    code = (
        "from ppinfer.constraints import regex_automaton as r; "
        "a = r(r'(a|c)*b', [b'', b'a', b'b', b'c', b'ca'], eos_id=0); "
        "print(a.next_state.tolist(), a.final.tolist(), int(a.initial))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "3")
    }
    assert len(outs) == 1, outs
