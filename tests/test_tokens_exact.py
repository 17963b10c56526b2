"""Token-level programs checked exactly: ``semantics.check_exact`` runs the compiled SMC/Steer loop
that ``pp.infer`` runs on every value of its randomness (each particle's token at each step, each
selection cell) and compares the expected output measure and E[Ẑ] with the exact denotation.

Setting: a bigram LM over {EOS, a, b} (prompt [EOS], as BOS), N = 2 particles, T = 3 new tokens
(T = 2 for Steer), particles stop at EOS (from the first step on: the finished-particle masks
run). The constraint: no token repeats the previous one (EOS may) and the first token is not ``b``,
so the allowed mass is below 1 at every step; a potential rewards ``b``.

Valid (exact to float64 round-off, tol 1e-10): the locally constrained proposal
(``tk.masked_next_token`` as the proposal: the engine's p/q weight is the allowed mass), a twisted
program (``tk.twist``: ψ_t − ψ_{t−1}, the last ψ removed), and the learned-twist program of
:mod:`ppinfer.vi.token_twist` with its twist-induced proposal; the twisted programs' denotation is
the untwisted target's. Broken (each off by orders of magnitude more than 1e-3): the allowed mass
dropped from the proposal's weight — in the engine, which ``check_exact`` itself rejects, and in a
hand-written "proposal program" — a twist that does not subtract its predecessor, and a twist that
is not removed at the end.

What ``check_exact(program)`` compares: the loop against ⟦program⟧, the denotation of the program
it is given. A mistake *inside the program* (a twist that does not telescope, a hand-written
proposal step whose weight lacks the allowed mass) changes ⟦program⟧ itself, and the loop runs that
wrong program faithfully, so the report on it is ok. Such a variant V is caught against the target
program T: the loop's exact expected output E_alg(V) is within ``report.measure_error`` of ⟦V⟧, so
``|E_alg(V) − ⟦T⟧|`` is within it of ``⟦V⟧.max_abs_diff(⟦T⟧)``; and ``report.expected_evidence``
is the loop's exact E[Ẑ], compared with Z_T directly (:func:`against_target`).

Precision: the LM's next-token log-probabilities are float32 (``tokens.LMPrompt.step`` casts them),
so a token law normalised in float32 sums to 1 only up to ~1e-7, and the expected output sums the
other particle's draws out: the check is then exact only to ~1e-7
(:func:`test_float32_draw_laws_are_exact_to_float32`). The other programs draw tokens from laws
normalised in float64 — the library's ``next_token``/``masked_next_token`` given a float64
``temperature`` of 1: the float32 log-probabilities are the model, renormalised in float64.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp

import ppinfer as pp
import ppinfer.weighted as weighted
from ppinfer import tokens as tk
from ppinfer.constraints import regex_automaton
from ppinfer.lm import NGramLM
from ppinfer.primitives import factor
from ppinfer.vi import token_twist as tt
from semantics import check_exact, check_unbiased_evidence, denote, smc_log_evidence_replicates

EOS, V, T = 0, 3, 3
PROBS = np.array(
    [
        [0.20, 0.50, 0.30],  # after EOS (the prompt)
        [0.30, 0.20, 0.50],  # after a
        [0.40, 0.45, 0.15],  # after b
    ]
)
LM = NGramLM.from_probs(PROBS, bos_id=EOS)
P = {t: tk.prompt(LM, [EOS], t) for t in (2, T)}
TOL = 1e-10
BROKEN = 1e-3
F32_FLOOR = 1e-6  # float32 token laws: measured ≈ 1e-7 (module docstring)


def f64(x=1.0):
    """A float64 scalar under x64, as check_exact runs (float32 otherwise, e.g. under ``pp.infer``)."""
    return jnp.asarray(x, jnp.result_type(float))


def allowed(ctx):
    """bool[V]: not the previous token (EOS may repeat), and not ``b`` as the first token."""
    prev = jnp.where(ctx.length > 0, ctx.tokens[jnp.maximum(ctx.length - 1, 0)], -1)
    v = jnp.arange(V)
    return ((v != prev) | (v == EOS)) & ((v != 2) | (ctx.length > 0))


def log_allowed_mass(ctx):
    """log Σ_{v allowed} p(v), p the float64-renormalised next-token law (the law tokens are drawn from)."""
    logp = jax.nn.log_softmax(ctx.logp.astype(f64().dtype))
    return logsumexp(jnp.where(allowed(ctx), logp, -jnp.inf))


def init(p):
    return tk.Context.start(p)


def constrained_token(ctx, temperature):
    """The target's token: the LM, the constraint, the potential; stop at EOS."""
    tok = pp.sample("tok", ctx.next_token(temperature))
    pp.condition("allowed", allowed(ctx)[tok])
    pp.factor("likes_b", 0.7 * (tok == 2))
    pp.stop(tok == EOS)
    return tok


def target(num_steps, temperature=f64):
    """The target program (``temperature()``: float64 1 by default, see the module docstring)."""

    def step(ctx, t, p):
        return ctx.extend(p, constrained_token(ctx, temperature()))

    return pp.sequential(init, step, num_steps)


def constrained_proposal(ctx, t, p):
    """The locally constrained proposal: allowed tokens only; the engine adds p/q = the allowed mass."""
    pp.sample("tok", tk.masked_next_token(ctx, allowed(ctx), temperature=f64()))


def constrained_proposal_f32(ctx, t, p):
    pp.sample("tok", tk.masked_next_token(ctx, allowed(ctx)))


def proposal_program(with_mass: bool, num_steps: int = T):
    """The locally constrained sampler written as the program: draw from the renormalised allowed
    law and add ``log(allowed mass)`` (valid: the same measure as the target) — or forget it."""

    def step(ctx, t, p):
        tok = pp.sample("tok", tk.masked_next_token(ctx, allowed(ctx), temperature=f64()))
        if with_mass:
            pp.factor("allowed_mass", log_allowed_mass(ctx))
        pp.factor("likes_b", 0.7 * (tok == 2))
        pp.stop(tok == EOS)
        return ctx.extend(p, tok)

    return pp.sequential(init, step, num_steps)


def no_predecessor_twist(name, value, previous, final=False):
    """Broken ``tk.twist``: adds ψ_t instead of ψ_t − ψ_{t−1}."""
    current = jnp.where(final, 0.0, value)
    factor(name, current)
    return current


def never_final_twist(name, value, previous, final=False):
    """Broken ``tk.twist``: adds ψ_t − ψ_{t−1} but never removes the last ψ."""
    return tk.twist(name, value, previous, final=False)


def twisted_program(apply_twist=tk.twist, num_steps: int = T):
    """The target with a one-step lookahead twist ψ(x_{1:t+1}) = log(allowed mass of the next token),
    applied by ``apply_twist`` (``tk.twist``: valid, the twists telescope)."""

    def init_(p):
        return tk.Context.start(p), jnp.zeros((), f64().dtype)

    def step(state, t, p):
        ctx, psi = state
        tok = constrained_token(ctx, f64())
        new = ctx.extend(p, tok)
        final = (tok == EOS) | (t == num_steps - 1)
        return new, apply_twist("twist", log_allowed_mass(new), psi, final=final)

    return pp.sequential(init_, step, num_steps)


def twisted_constrained_proposal(state, t, p):
    constrained_proposal(state[0], t, p)


# --- helpers -------------------------------------------------------------------------------------


def timed_check(program, algorithm, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    report = check_exact(program, *args, algorithm=algorithm, tol=TOL)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        f"\n{report.algorithm}: max_abs_error={report.max_abs_error:.3e} "
        f"(measure {report.measure_error:.2e}, evidence {report.evidence_error:.2e}), "
        f"runs={report.num_runs}, {wall:.1f} s wall, {cpu:.1f} s CPU"
    )
    return report


def against_target(report, program, reference_program, args):
    """``(low, high, evidence_error)``: the loop's exact expected output measure on ``program`` (of
    which ``report`` is the ``check_exact``) is within ``[low, high]`` of ⟦reference_program⟧ in
    max-abs, and ``evidence_error = |E[Ẑ] − Z_reference|`` exactly."""
    with jax.enable_x64(True):
        reference = denote(reference_program, *args)
        d = denote(program, *args).max_abs_diff(reference)
    evidence_error = abs(report.expected_evidence - reference.total())
    print(f"  vs the target: measure {d:.3e} ± {report.measure_error:.1e}, evidence {evidence_error:.3e}")
    return d - report.measure_error, d + report.measure_error, evidence_error


# --- valid programs pass exactly -----------------------------------------------------------------

ALGORITHMS = {
    "smc-every-step": (lambda **kw: pp.SMC(2, ess_threshold=1.0, **kw), T),
    "smc-adaptive": (lambda **kw: pp.SMC(2, **kw), T),
    "steer": (lambda **kw: pp.Steer(2, 2, **kw), 2),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_locally_constrained_proposal_is_exact(name):
    algorithm, num_steps = ALGORITHMS[name]
    report = timed_check(target(num_steps), algorithm(proposal=constrained_proposal), P[num_steps])
    assert report.ok, report
    assert report.num_runs > 1


@pytest.mark.parametrize("name", ["smc-every-step"])
def test_twisted_program_is_exact_and_denotes_the_target(name):
    algorithm, num_steps = ALGORITHMS[name]
    program = twisted_program(num_steps=num_steps)
    report = timed_check(program, algorithm(), P[num_steps])
    assert report.ok, report
    _, high, evidence_error = against_target(report, program, target(num_steps), (P[num_steps],))
    assert high < TOL and evidence_error < TOL


def test_twisted_program_with_the_constrained_proposal_is_exact():
    program = twisted_program()
    report = timed_check(program, pp.SMC(2, ess_threshold=1.0, proposal=twisted_constrained_proposal), P[T])
    assert report.ok, report
    _, high, evidence_error = against_target(report, program, target(T), (P[T],))
    assert high < TOL and evidence_error < TOL


def test_proposal_program_with_the_allowed_mass_denotes_the_target():
    program = proposal_program(with_mass=True)
    report = timed_check(program, pp.SMC(2, ess_threshold=1.0), P[T])
    assert report.ok, report
    _, high, evidence_error = against_target(report, program, target(T), (P[T],))
    assert high < TOL and evidence_error < TOL


# The learned twist: ψ_θ(x_{1:t+1}) from a random network (strong: scale 1.5), strength 1 vs 0.
AUTOMATON = regex_automaton(r"a*b", [b"", b"a", b"b"], eos_id=EOS)


def learned_twist(strength):
    twist = tt.init_token_twist(3, AUTOMATON, tt.log_prob_features(V), T, hidden=4, scale=1.5)
    with jax.enable_x64(True):  # float64 twist values: the twisted proposal is normalised in float64
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), twist._replace(strength=strength))


def library_twisted_program():
    """``tt.twisted_program(T)`` with its ψ carried in float64. The library's init carries ψ as
    float32 (``jnp.zeros((), jnp.float32)``); with a float64 twist the engine casts each step's ψ to
    the init's float32 (``suspended``: the state keeps init's dtypes) while ⟦·⟧ keeps float64, so
    the twists telescope only to ~1e-9 in the engine (measured 1.4e-9)."""
    program = tt.twisted_program(T)

    def init_(p, automaton, twist):
        ctx, s, psi = program.init(p, automaton, twist)
        return ctx, s, psi.astype(f64().dtype)

    return pp.sequential(init_, program.step, T)


def test_learned_token_twist_is_exact_and_telescopes():
    program, args = library_twisted_program(), (P[T], AUTOMATON)
    algorithm = pp.SMC(2, ess_threshold=1.0, proposal=tt.twisted_proposal)
    report = timed_check(program, algorithm, *args, learned_twist(1.0))
    assert report.ok, report
    # The same program with strength 0 is the untwisted target (its proposal the masked LM).
    _, high, evidence_error = against_target(report, program, program, (*args, learned_twist(0.0)))
    assert high < TOL and evidence_error < TOL


# --- broken variants fail --------------------------------------------------------------------------


def test_proposal_weight_without_the_allowed_mass_fails(monkeypatch):
    # The engine draws from the masked LM but forgets the proposal's p/q (= the allowed mass).
    original = weighted.weight_from_traces
    monkeypatch.setattr(weighted, "weight_from_traces", lambda p_trace, q_trace=None: original(p_trace))
    report = timed_check(target(T), pp.SMC(2, ess_threshold=1.0, proposal=constrained_proposal), P[T])
    assert not report.ok and report.max_abs_error > BROKEN, report


def test_proposal_program_without_the_allowed_mass_is_not_the_target():
    program = proposal_program(with_mass=False)
    report = timed_check(program, pp.SMC(2, ess_threshold=1.0), P[T])
    assert report.ok, report  # the loop runs the wrong program faithfully …
    low, _, evidence_error = against_target(report, program, target(T), (P[T],))
    assert low > BROKEN and evidence_error > BROKEN  # … and its output is far from the target


class MaskedDrawUnmaskedDensity(dist.CategoricalLogits):
    """Broken proposal law: draws from the masked LM but reports the unmasked LM's ``log_prob``, so the
    engine's p/q is 1 — the allowed mass dropped from the weight, inside the proposal. Real SMC with it
    is biased (log Ẑ at N = 2·10^4: 0.374 against the exact −0.251; the honest proposal −0.251)."""

    def __init__(self, logits, mask):
        self.masked_logits = jnp.where(mask, logits, -1e30)
        super().__init__(logits=logits)

    def sample(self, key, sample_shape=()):
        return dist.CategoricalLogits(self.masked_logits).sample(key, sample_shape)


def lying_proposal(ctx, t, p):
    pp.sample("tok", MaskedDrawUnmaskedDensity(ctx.logp.astype(f64().dtype), allowed(ctx)))


@pytest.mark.xfail(
    strict=True,
    reason="check_exact reads a draw's law from log_prob (its stated assumption) and never calls sample: "
    "a proposal whose sampler and log_prob disagree is enumerated as the law log_prob reports",
)
def test_proposal_whose_sampler_disagrees_with_its_log_prob_is_caught():
    report = timed_check(target(T), pp.SMC(2, ess_threshold=1.0, proposal=lying_proposal), P[T])
    assert report.max_abs_error > BROKEN, report  # measured: 1.1e-16 (ok)


def test_proposal_whose_sampler_disagrees_with_its_log_prob_fails_the_evidence_check():
    """What check_exact cannot see (above), E[Ẑ] = Z over replicates of the loop pp.infer runs can:
    the honest proposal passes, the lying one fails (false-failure rate 1e-3 each)."""
    with jax.enable_x64(True):
        log_z = float(np.log(denote(target(T), P[T]).total()))
    honest = smc_log_evidence_replicates(target(T), (P[T],), 2000, 8, proposal=constrained_proposal_f32)
    assert check_unbiased_evidence(honest, log_z)
    lying = smc_log_evidence_replicates(target(T), (P[T],), 2000, 8, proposal=lying_proposal_f32)
    assert not check_unbiased_evidence(lying, log_z)


def lying_proposal_f32(ctx, t, p):
    pp.sample("tok", MaskedDrawUnmaskedDensity(ctx.logp, allowed(ctx)))


@pytest.mark.parametrize("broken", [no_predecessor_twist, never_final_twist])
def test_broken_twists_are_not_the_target(broken):
    program = twisted_program(broken)
    report = timed_check(program, pp.SMC(2, ess_threshold=1.0), P[T])
    assert report.ok, report
    low, _, evidence_error = against_target(report, program, target(T), (P[T],))
    assert low > BROKEN and evidence_error > BROKEN


# --- float32 token laws -----------------------------------------------------------------------------


@pytest.mark.parametrize("proposal", [constrained_proposal_f32], ids=["constrained"])
def test_float32_draw_laws_are_exact_to_float32(proposal):
    report = timed_check(target(T, lambda: 1.0), pp.SMC(2, ess_threshold=1.0, proposal=proposal), P[T])
    assert report.max_abs_error < F32_FLOOR, report
