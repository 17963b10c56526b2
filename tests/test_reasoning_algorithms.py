"""Step-level reasoning programs: chunking, and every algorithm on the embedded model with tiny sizes,
its compute accounting checked exactly."""

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from answer_rules import expected_answers

import ppinfer as pp
from ppinfer import reasoning as rs
from ppinfer import tokens as tk
from ppinfer.errors import ConfigError
from ppinfer.kernels.select import Beam, Conditional, Multinomial, ParentWeights
from ppinfer.lm import NGramLM, load_default
from semantics.check import selection_outcomes

EOS, A, B, DOT = 0, 1, 2, 3  # a 4-token character vocabulary for the n-gram tests
CHARS = {A: "a", B: "b", DOT: "."}


def decode(ids):
    return "".join(CHARS.get(int(i), "") for i in ids)


def bigram(next_probs):
    """A bigram LM from ``next_probs[prev] = probabilities of the next token``."""
    return NGramLM.from_probs(np.asarray(next_probs, np.float64), bos_id=EOS)


# --------------------------------------------------------------------------- chunking


def run_chunks(lm, max_chunk, num=64, key=0):
    p = tk.prompt(lm, [EOS], max_new_tokens=3 * max_chunk)
    ctx = tk.Context.start(p)

    def one(k):
        c, ended = rs.generate_chunk(k, ctx, p, (DOT,), EOS, max_chunk)
        return c.tokens, c.length, ended

    return jax.device_get(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(key), num)))


def test_chunk_stops_at_delimiter_or_max_length():
    lm = bigram(np.full((4, 4), 0.25))
    toks, lens, ended = run_chunks(lm, max_chunk=5)
    assert lens.min() >= 1 and lens.max() <= 5
    for row, n, e in zip(toks, lens, ended, strict=True):
        chunk = list(row[:n])
        # no delimiter or EOS inside the chunk; a chunk shorter than the limit ends with one
        assert not ({DOT, EOS} & set(chunk[:-1]))
        assert n == 5 or chunk[-1] in (DOT, EOS)
        assert e == (chunk[-1] == EOS)
    assert (lens == 5).any() and (lens < 5).any()


def test_chunk_deterministic_lengths():
    always_a = np.zeros((4, 4))
    always_a[:, A] = 1.0
    _, lens, _ = run_chunks(bigram(always_a), max_chunk=4)
    assert (lens == 4).all()  # never a delimiter: cut at max_chunk
    a_then_dot = np.zeros((4, 4))
    a_then_dot[:, A] = 1.0
    a_then_dot[A] = [0, 0, 0, 1.0]
    toks, lens, ended = run_chunks(bigram(a_then_dot), max_chunk=6)
    assert (lens == 2).all() and (toks[:, :2] == [A, DOT]).all() and not ended.any()


# --------------------------------------------------------------------------- n-gram accounting


class Counter:
    """A reward that counts its calls in a run (not the eager probe of check_reward)."""

    def __init__(self, fn=lambda q, s: 0.5 + 0.4 * (s.count("a") % 2)):
        self.fn, self.calls = fn, 0

    def __call__(self, question, solution):
        if question != rs.PROBE_QUESTION:
            self.calls += 1
        return self.fn(question, solution)


ALGORITHMS = [
    lambda n: rs.ParticleFilter(n),
    lambda n: rs.ParticleFilter(n, answer="argmax", resampling="systematic"),
    lambda n: rs.FeynmanKacFilter(n),
    lambda n: rs.FeynmanKacFilter(n, ess_threshold=1.0),
    lambda n: rs.BeamSearch(n, expand=2),
    lambda n: rs.BestOfN(n, outcome=Counter()),
    lambda n: rs.MajorityVote(n),
    lambda n: rs.MajorityVote(n, reward=Counter()),
    lambda n: rs.Sampling(n),
]


@pytest.fixture(scope="module")
def fixed_lengths():
    """No delimiter and no EOS: every chunk has exactly max_chunk tokens."""
    probs = np.zeros((4, 4))
    probs[:, [A, B]] = 0.5
    prm = Counter()
    spec = rs.StepSpec(decode=decode, delimiters=(DOT,), eos_id=EOS, max_chunk=3, max_steps=4, prm=prm)
    return rs.reasoning_program(spec), rs.question_args(bigram(probs), spec, [EOS]), prm


def parity(solution: str) -> int:
    return solution.count("a") % 2


@pytest.mark.parametrize("make", ALGORITHMS)
def test_answer_follows_the_rule(fixed_lengths, make):
    """The answer is the one the algorithm's rule picks from the returned particles: weighted
    majority of the normalised weights, highest score or reward, plain or reward-weighted majority,
    or the first sample (``answer_rules``). The answer is the parity of the number of "a"s, on which
    the reward depends (0.5 or 0.9), so weights and votes differ between answers. Power: over the 8
    keys the rule's answer is not always the first particle's (for Sampling, whose rule is the
    first particle, not always the plain majority) — measured: 1 to 5 of the 8 keys."""
    program, args, _ = fixed_lengths
    not_first = not_majority = 0
    for key in range(8):
        alg = dataclasses.replace(make(5), answer_parser=parity)
        r = pp.infer(program, args, algorithm=alg, key=key)
        ex = r.extras
        assert ex["answers"] == [parity(s) for s in ex["solutions"]]
        expected = expected_answers(alg, r)
        assert ex["answer"] in expected, (key, ex["answer"], expected, ex["answers"])
        not_first += expected[0] != ex["answers"][0]
        not_majority += expected[0] != max((0, 1), key=ex["answers"].count)
    assert (not_majority if isinstance(alg, rs.Sampling) else not_first) > 0


@pytest.mark.parametrize("make", ALGORITHMS)
def test_accounting_exact_with_fixed_chunk_lengths(fixed_lengths, make):
    """N · K · S tokens whatever resampling does; the PRM is called once per particle and step."""
    program, args, prm = fixed_lengths
    n, k, s = 5, 3, 4
    alg = make(n)
    before = prm.calls
    r = pp.infer(program, args, algorithm=alg, key=1)
    prm_calls = prm.calls - before
    outcome = getattr(alg, "outcome", None) or getattr(alg, "reward", None)
    assert r.extras["generated_tokens"] == n * k * s
    assert r.extras["num_steps"] == s
    assert r.extras["reward_calls"] == prm_calls + (outcome.calls if outcome else 0)
    scored = isinstance(alg, rs.ParticleFilter | rs.FeynmanKacFilter | rs.BeamSearch)
    assert prm_calls == (n * s if scored else 0)
    assert (outcome.calls if outcome else 0) == (0 if scored else (n if outcome else 0))
    assert all(len(t) == k * s for t in r.extras["solutions"])


def test_accounting_stops_at_eos():
    """Each particle says "a" then EOS: one step of 2 tokens, then the loop ends early."""
    probs = np.zeros((4, 4))
    probs[EOS, A] = 1.0
    probs[A, EOS] = probs[B, EOS] = probs[DOT, EOS] = 1.0
    prm = Counter()
    spec = rs.StepSpec(decode=decode, delimiters=(DOT,), eos_id=EOS, max_chunk=4, max_steps=5, prm=prm)
    r = pp.infer(
        rs.reasoning_program(spec),
        rs.question_args(bigram(probs), spec, [EOS]),
        algorithm=rs.FeynmanKacFilter(6),
        key=0,
    )
    assert r.extras["generated_tokens"] == 12 and r.extras["reward_calls"] == prm.calls == 6
    assert r.extras["num_steps"] == 1 and r.extras["solutions"] == ["a"] * 6
    assert bool(jnp.all(r.state.finished))


# --------------------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def embedded():
    lm = load_default()
    prm = Counter(rs.arithmetic_prm)
    spec = rs.StepSpec(
        decode=lm.tokenizer.decode,
        delimiters=tuple(lm.tokenizer.encode(".")),
        eos_id=lm.eos_id,
        max_chunk=8,
        max_steps=3,
        prm=prm,
    )
    args = rs.question_args(lm, spec, "<|endoftext|>Q: 7+2 = ?", pad_to=16)
    return rs.reasoning_program(spec), args, prm


@pytest.mark.parametrize("make", ALGORITHMS[:1] + ALGORITHMS[2:])  # one resampling scheme: one compile
def test_algorithms_on_embedded_model(embedded, make):
    program, args, prm = embedded
    alg = make(3)
    before = prm.calls
    r = pp.infer(program, args, algorithm=alg, key=2)
    ex = r.extras
    outcome = getattr(alg, "outcome", None) or getattr(alg, "reward", None)
    outcome_calls = outcome.calls if outcome else 0
    assert ex["reward_calls"] == prm.calls - before + outcome_calls
    assert ex["question"] == "Q: 7+2 = ?"
    assert len(ex["solutions"]) == 3
    assert ex["answers"] == [rs.parse_answer(s) for s in ex["solutions"]]
    assert ex["answer"] in expected_answers(alg, r)  # the algorithm's rule, from the particles
    assert 1 <= ex["num_steps"] <= 3 and 3 <= ex["generated_tokens"] <= 3 * 8 * 3
    if isinstance(alg, rs.Sampling | rs.BestOfN | rs.MajorityVote):
        # no resampling: every generated token is in a final solution
        assert ex["generated_tokens"] == int(jnp.sum(r.samples["length"]))
    if isinstance(alg, rs.FeynmanKacFilter):
        assert np.isfinite(r.log_evidence)


def test_perfect_verifier_pf_returns_an_accepted_solution(embedded):
    """PF with the exact PRM and argmax never returns a solution the PRM rejects when an accepted
    one exists among the final particles."""
    program, args, _ = embedded
    for key in range(3):
        r = pp.infer(program, args, algorithm=rs.ParticleFilter(3, answer="argmax"), key=key)
        q, sols = r.extras["question"], r.extras["solutions"]
        accepted = [rs.arithmetic_prm(q, s) == 1.0 for s in sols]
        best = int(np.argmax(np.asarray(r.samples["score"])))
        assert accepted[best] or not any(accepted)
        assert r.extras["answer"] == r.extras["answers"][best]


def test_beam_selection_keeps_the_best():
    """BeamSearch's selection: the top ``keep`` by weight (the FK program's weight is ``φ(r) −
    log N``, increasing in the score; ties: the lower index), copies spread evenly, each keeping its
    parent's weight. It reads no uniform."""
    score = jnp.array([0.1, 0.9, 0.5, 0.9, 0.0, 0.7])
    log_weights = rs.potential(score, 1e-3, 1.0) - jnp.log(6)
    for keep, expected in [(1, [1] * 6), (2, [1, 1, 1, 3, 3, 3]), (3, [1, 1, 3, 3, 5, 5])]:
        for u in (jnp.zeros(6), jnp.full(6, 0.99)):
            ancestors, new = Beam(keep)(u, log_weights)
            assert ancestors.tolist() == expected and np.array_equal(new, log_weights[ancestors])


def test_selections_are_what_they_claim():
    """The exact law of each selection (``selection_outcomes``): ``Conditional(Multinomial())`` is
    multinomial resampling conditioned on slot 0 keeping particle 0 (the other slots i.i.d. ∝ w);
    ``ParentWeights`` and ``Beam`` change the expected measure ``Σ w_i δ_i`` (not valid, by
    design; a valid selection preserves it, ``test_check_exact``)."""
    w = np.array([0.2, 0.3, 0.5])
    law = selection_outcomes(Conditional(Multinomial()), np.log(w))
    assert sum(p for p, _, _ in law) == pytest.approx(1.0, abs=1e-12)
    for p, anc, new in law:
        assert anc[0] == 0 and p == pytest.approx(w[anc[1]] * w[anc[2]], abs=1e-12)
        assert np.allclose(new, np.log(1.0 / 3.0))  # log Ẑ − log N, Ẑ = 1

    w = np.array([0.25, 0.75])

    def expected_measure(selection):
        m = np.zeros(2)
        for p, anc, new in selection_outcomes(selection, np.log(w)):
            np.add.at(m, list(anc), p * np.exp(new))
        return m

    assert np.allclose(expected_measure(ParentWeights(Multinomial())), 2 * w**2, atol=1e-12)
    assert np.allclose(expected_measure(Beam(1)), [0.0, 2 * 0.75])


def test_core_smc_runs_a_reasoning_program(fixed_lengths):
    """The chunk is drawn from the step's key (no latent sample site): pp.SMC accepts the program,
    and on the "fk" program it is the Feynman–Kac filter — the same loop, the same numbers. A
    sequential program that draws nothing is still refused."""
    program, args, _ = fixed_lengths
    smc = pp.infer(program, args, algorithm=pp.SMC(5, ess_threshold=0.5), key=3)
    fk = pp.infer(program, args, algorithm=rs.FeynmanKacFilter(5), key=3)
    assert smc.log_evidence == pytest.approx(fk.log_evidence, abs=1e-6)
    assert np.array_equal(smc.state.ctx.tokens, fk.state.ctx.tokens)
    with pytest.raises(pp.ModelError, match="no random choice"):
        pp.infer(pp.sequential(lambda: 0.0, lambda s, t: s, 2), algorithm=pp.SMC(4))


def test_errors(embedded):
    program, args, _ = embedded
    with pytest.raises(ConfigError):
        rs.ParticleFilter(0)
    with pytest.raises(ConfigError):
        rs.ParticleFilter(4, answer="median")
    with pytest.raises(ConfigError):
        rs.FeynmanKacFilter(4, tau=0.0)
    with pytest.raises(ConfigError):
        rs.BeamSearch(4, expand=0)
    with pytest.raises(ConfigError):
        rs.StepSpec(decode=decode, delimiters=(), eos_id=EOS)
    with pytest.raises(ConfigError):
        rs.StepSpec(decode=decode, delimiters=(DOT,), eos_id=EOS, max_chunk=0)
    with pytest.raises(ConfigError):
        rs.reasoning_program(rs.StepSpec(decode=decode, delimiters=(DOT,), eos_id=EOS))  # fk needs a PRM
    with pytest.raises(ConfigError, match="step-level program"):
        pp.infer(pp.sequential(lambda: 0, lambda s, t: s, 1), algorithm=rs.ParticleFilter(2))
    with pytest.raises(ConfigError, match="one argument"):
        pp.infer(program, args, args, algorithm=rs.Sampling(2))


def test_reward_failing_during_the_run_is_a_model_error(fixed_lengths):
    program, args, _ = fixed_lengths

    def fragile(question, solution):
        if "b" in solution:
            raise KeyError("no b please")
        return 0.5

    spec = rs.StepSpec(decode=decode, delimiters=(DOT,), eos_id=EOS, max_chunk=3, max_steps=4, prm=fragile)
    with pytest.raises(pp.ModelError, match="no b please"):
        pp.infer(rs.reasoning_program(spec), args, algorithm=rs.FeynmanKacFilter(5), key=0)


@pytest.mark.parametrize("bad", [float("nan"), "oops", 2.0, np.array([0.3, 0.4])], ids=repr)
def test_reward_returning_a_non_score_mid_run_is_a_model_error(fixed_lengths, bad):
    """Fine on the probe (an empty solution), then NaN, a string, 2.0 or an array: these were read
    as 0 (or clipped) and the run answered silently (hunt 16)."""
    program, args, _ = fixed_lengths
    reward = lambda question, solution: 0.5 if solution == "" else bad
    spec = rs.StepSpec(decode=decode, delimiters=(DOT,), eos_id=EOS, max_chunk=3, max_steps=4, prm=reward)
    message = "the process reward returned .* on solution '.+': a reward is a number in \\[0, 1\\]"
    with pytest.raises(pp.ModelError, match=message):
        pp.infer(rs.reasoning_program(spec), args, algorithm=rs.ParticleFilter(4), key=0)
    with pytest.raises(pp.ModelError, match="the MajorityVote reward returned"):
        pp.infer(program, args, algorithm=rs.MajorityVote(4, reward=reward), key=0)


def test_an_unhashable_answer_is_a_model_error(fixed_lengths):
    program, args, _ = fixed_lengths
    alg = rs.MajorityVote(4, answer_parser=lambda s: [len(s)])
    with pytest.raises(pp.ModelError, match="returned \\[12\\] on the solution .*must be hashable"):
        pp.infer(program, args, algorithm=alg, key=0)


def test_answer_parser_failing_is_a_model_error(fixed_lengths):
    program, args, _ = fixed_lengths

    def picky(solution):
        raise ValueError("cannot read this")

    alg = dataclasses.replace(rs.BestOfN(3), answer_parser=picky)
    with pytest.raises(pp.ModelError, match="answer_parser 'picky' raised ValueError: cannot read this"):
        pp.infer(program, args, algorithm=alg, key=0)


def test_reward_errors_belong_to_the_run_that_raised_them(fixed_lengths):
    """Two threads, one reward that fails on some solutions and one that never does: every run of the
    first raises (naming its solution), no run of the second does. (With one process-wide error list
    read after each run, the runs saw each other's errors: 7 of 15 in each thread went wrong.)"""
    _, args, _ = fixed_lengths

    def slow(fail):
        def reward(question, solution):
            time.sleep(0.002)  # long host calls: the two runs overlap
            if fail and "b" in solution:
                raise KeyError("no b please")
            return 0.5

        return reward

    outcomes = {True: [], False: []}

    def work(fail):
        spec = rs.StepSpec(
            decode=decode, delimiters=(DOT,), eos_id=EOS, max_chunk=3, max_steps=4, prm=slow(fail)
        )
        for i in range(8):
            try:
                pp.infer(rs.reasoning_program(spec), args, algorithm=rs.FeynmanKacFilter(5), key=i)
                outcomes[fail].append("ok")
            except pp.ModelError as e:
                outcomes[fail].append(str(e))

    pool = [threading.Thread(target=work, args=(fail,)) for fail in (True, False)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert outcomes[False] == ["ok"] * 8
    assert len(outcomes[True]) == 8
    for message in outcomes[True]:
        assert message.startswith("the process reward failed on solution") and "no b please" in message


def test_particle_filter_weights_are_softmax_of_potentials(fixed_lengths):
    """Puri et al.'s weights: softmax_i(logit(clip(r_i)) / τ) of the final scores."""
    program, args, _ = fixed_lengths
    r = pp.infer(program, args, algorithm=rs.ParticleFilter(5, answer="argmax"), key=3)
    score = np.clip(np.asarray(r.samples["score"], np.float64), 1e-3, 1 - 1e-3)
    logits = np.log(score / (1 - score))
    assert np.allclose(r.weights, np.exp(logits) / np.exp(logits).sum(), atol=1e-5)
    assert r.extras["answer"] == r.extras["answers"][int(np.argmax(logits))]


def test_question_too_long_for_padding(embedded):
    program, _, _ = embedded
    with pytest.raises(ConfigError, match="pad_to"):
        rs.question_args(load_default(), program.spec, "<|endoftext|>Q: 1+2+3+4+5+6+7+8 = ?", pad_to=4)
