"""Particle Gibbs over reasoning steps: exact compute accounting, the reference kept in every
conditional sweep, a perfect verifier never overruled, and the kernel's invariance checked against
exact enumeration on a bigram LM."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from answer_rules import expected_answers
from scipy import stats

import ppinfer as pp
from ppinfer import reasoning as rs
from ppinfer.errors import ConfigError
from ppinfer.lm import NGramLM

EOS, A, B, DOT = 0, 1, 2, 3
CHARS = {A: "a", B: "b", DOT: "."}


def decode(ids):
    return "".join(CHARS.get(int(i), "") for i in ids)


class Counter:
    """A reward that counts its calls in a run (not the eager probe of check_reward)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, question, solution):
        if question != rs.PROBE_QUESTION:
            self.calls += 1
        return self.fn(question, solution)


def no_b(question, solution):
    """A perfect 0/1 verifier: a solution is accepted while it has no "b"."""
    return float("b" not in solution)


def setup(probs, prm, max_chunk=3, max_steps=4, clip=1e-3):
    lm = NGramLM.from_probs(np.asarray(probs, np.float64), bos_id=EOS)
    spec = rs.StepSpec(
        decode=decode, delimiters=(DOT,), eos_id=EOS, max_chunk=max_chunk, max_steps=max_steps,
        prm=prm, clip=clip,
    )
    return rs.reasoning_program(spec), rs.question_args(lm, spec, [EOS])


AB_ONLY = np.zeros((4, 4))
AB_ONLY[:, [A, B]] = [0.75, 0.25]  # no delimiter, no EOS: every chunk has exactly max_chunk tokens


@pytest.mark.parametrize("weights", rs.PG_WEIGHTS)
def test_accounting_exact(weights):
    """Fixed chunk lengths K, S steps, N particles, M sweeps: the first sweep samples N·K·S tokens,
    each later one (N − 1)·K·S plus K·S forced reference tokens; the PRM is called N·S times per
    sweep (the pinned particle included), and every call is counted. The answer (the parity of the
    number of "a"s, on which the PRM depends) is the weighted majority of the final sweep's
    normalised weights (``answer_rules``)."""
    prm = Counter(lambda q, s: 0.2 + 0.6 * (s.count("a") % 2))
    program, args = setup(AB_ONLY, prm)
    n, k, s, m = 5, 3, 4, 3
    before = prm.calls
    parity = lambda text: text.count("a") % 2
    alg = rs.ParticleGibbs(n, m, weights=weights, answer_parser=parity)
    r = pp.infer(program, args, algorithm=alg, key=4)
    ex = r.extras
    assert ex["generated_tokens"] == n * k * s + (m - 1) * (n - 1) * k * s
    assert ex["forced_tokens"] == (m - 1) * k * s
    assert ex["reward_calls"] == prm.calls - before == m * n * s
    assert len(ex["sweeps"]) == len(ex["references"]) == m
    assert all(len(sol) == k * s for sweep in ex["sweeps"] for sol in sweep)
    assert ex["answers"] == [parity(sol) for sol in ex["solutions"]]
    assert ex["answer"] in expected_answers(alg, r)


@pytest.mark.parametrize("weights", rs.PG_WEIGHTS)
def test_answer_follows_the_rule(weights):
    """The answer (the parity of the number of "a"s, on which the PRM depends) is, for
    ``answer="vote"``, the weighted majority of the final sweep's normalised weights and, for
    ``"argmax"``, the highest final score (ties: weight, then index), recomputed from the returned
    particles (``answer_rules``). Power: over the 6 keys, with either rule, the answer differs from
    the plain majority of the final particles at least once (measured: 2 of 6 for each rule and
    each weighting)."""
    prm = Counter(lambda q, s: 0.2 + 0.6 * (s.count("a") % 2))
    program, args = setup(AB_ONLY, prm)
    parity = lambda text: text.count("a") % 2
    differs = {"vote": 0, "argmax": 0}
    for key, rule in itertools.product(range(6), rs.ANSWER_RULES):
        alg = rs.ParticleGibbs(5, 3, weights=weights, answer=rule, answer_parser=parity)
        r = pp.infer(program, args, algorithm=alg, key=key)
        ex = r.extras
        assert ex["answers"] == [parity(sol) for sol in ex["solutions"]]
        expected = expected_answers(alg, r)
        assert ex["answer"] in expected, (key, rule, ex["answer"], expected)
        differs[rule] += expected[0] != max((0, 1), key=ex["answers"].count)
    assert differs["vote"] > 0 and differs["argmax"] > 0


def test_reference_is_kept():
    """In every conditional sweep, slot 0 ends as exactly the reference drawn after the previous
    sweep, while the free particles are new draws (12 tokens over {a, b}: 4096 sequences)."""
    prm = Counter(lambda q, s: 0.3 + 0.4 * (s.count("a") % 2))
    program, args = setup(AB_ONLY, prm)
    moved = 0
    for key in range(3):
        r = pp.infer(program, args, algorithm=rs.ParticleGibbs(4, 4, weights="puri"), key=key)
        sweeps, refs = r.extras["sweeps"], r.extras["references"]
        for m in range(1, 4):
            assert sweeps[m][0] == refs[m - 1]
            assert refs[m] in sweeps[m]
            assert len(set(sweeps[m])) > 1  # not a copy of the reference everywhere
        assert refs[-1] == r.extras["solutions"][r.extras["reference_index"]]
        moved += sum(refs[m] != refs[m - 1] for m in range(1, 4))
    assert moved > 0  # the chain moves


@pytest.mark.parametrize("weights", rs.PG_WEIGHTS)
def test_perfect_verifier_is_never_overruled(weights):
    """With the exact 0/1 PRM, the answer (here the solution text) is an accepted solution whenever
    the final sweep holds one, and once a sweep found an accepted solution every later sweep holds
    one (the reference carries it). A rejected reference is drawn over an accepted one with
    probability ≤ N·(ε/(1−ε))² ≈ 3e-6 per draw (ε = 1e-3); over these 16 runs of 3 sweeps the
    false-failure rate is < 1e-3."""
    probs = np.zeros((4, 4))
    probs[:, [A, B]] = [0.8, 0.2]
    program, args = setup(probs, no_b, max_chunk=3, max_steps=3)  # P(accepted sample) = 0.8**9 = 0.13
    exercised = 0
    for key, answer in itertools.product(range(4), rs.ANSWER_RULES):
        alg = rs.ParticleGibbs(3, 3, weights=weights, answer=answer, answer_parser=lambda s: s)
        r = pp.infer(program, args, algorithm=alg, key=key)
        final = r.extras["solutions"]
        accepted = [no_b("", s) == 1.0 for s in final]
        assert accepted[final.index(r.extras["answer"])] or not any(accepted)
        exercised += any(accepted) and not all(accepted)
        found = [any(no_b("", s) == 1.0 for s in sweep) for sweep in r.extras["sweeps"]]
        for m in range(1, len(found)):
            assert found[m] or not any(found[:m])
    assert exercised > 0  # the property was tested on mixed populations


# --------------------------------------------------------------------------- invariance

PROBS = np.array(
    [
        [0.10, 0.40, 0.30, 0.20],  # after EOS (the prompt)
        [0.20, 0.30, 0.20, 0.30],  # after "a"
        [0.15, 0.25, 0.35, 0.25],  # after "b"
        [0.20, 0.40, 0.30, 0.10],  # after "."
    ]
)
MAX_CHUNK, MAX_STEPS, TAU, CLIP = 2, 2, 0.7, 1e-3


def prm(question, solution):
    return (1.0 + solution.count("a")) / (2.0 + len(solution))


def phi(r):
    r = min(max(r, CLIP), 1 - CLIP)
    return np.log(r / (1 - r)) / TAU


def trajectories():
    """Every complete token sequence of the chunked program, with its LM probability."""

    def chunks(prev):
        for length in range(1, MAX_CHUNK + 1):
            for toks in itertools.product(range(4), repeat=length):
                ends = [t in (DOT, EOS) for t in toks]
                if any(ends[:-1]) or (length < MAX_CHUNK and not ends[-1]):
                    continue
                yield toks, float(np.prod([PROBS[a, b] for a, b in itertools.pairwise((prev, *toks))]))

    def rec(prefix, prob, step):
        for toks, p in chunks(prefix[-1] if prefix else EOS):
            seq = prefix + toks
            if toks[-1] == EOS or step + 1 == MAX_STEPS:
                yield seq, prob * p
            else:
                yield from rec(seq, prob * p, step + 1)

    return list(rec((), 1.0, 0))


def test_particle_gibbs_kernel_leaves_the_target_invariant():
    """x ~ π(x) ∝ p_LM(x) · exp φ(r_final(x)) (exact, by enumeration), one conditional sweep with x
    as reference (N = 3), draw the next reference x': x' ~ π again. Chi-square goodness of fit of
    4000 independent x' (cells with expected count < 5 merged), false-failure rate 1e-3; the same
    draws reject the LM prior p_LM (the test has power)."""
    seqs = trajectories()
    prior = np.array([p for _, p in seqs])
    assert prior.sum() == pytest.approx(1.0)
    target = prior * np.exp([phi(prm("", decode(s))) for s, _ in seqs])
    target /= target.sum()
    width = MAX_CHUNK * MAX_STEPS
    padded = np.array([list(s) + [0] * (width - len(s)) for s, _ in seqs], np.int32)

    spec = rs.StepSpec(decode=decode, delimiters=(DOT,), eos_id=EOS, max_chunk=MAX_CHUNK,
                       max_steps=MAX_STEPS, prm=prm, clip=CLIP)
    lm = NGramLM.from_probs(PROBS, bos_id=EOS)
    args = (rs.question_args(lm, spec, [EOS]),)
    program = rs.pinned_program(spec, TAU)
    reps = 4000
    rng = np.random.default_rng(11)
    start = rng.choice(len(seqs), size=reps, p=target)

    @jax.jit
    def run(keys, refs):
        def one(k, ref):
            out, idx = rs.conditional_sweep(k, program, args, 3, ref, jnp.asarray(True), "fk")
            ctx = out["state"].reasoning.ctx
            pinned_ok = jnp.all(ctx.tokens[0] == ref)
            return ctx.tokens[idx], ctx.length[idx], pinned_ok

        return jax.vmap(one)(keys, refs)

    toks, lens, pinned_ok = jax.device_get(run(jax.random.split(jax.random.PRNGKey(3), reps), padded[start]))
    assert pinned_ok.all()  # the pinned particle reproduced its reference token for token
    index = {s: i for i, (s, _) in enumerate(seqs)}
    drawn = np.array([index[tuple(int(t) for t in row[:n])] for row, n in zip(toks, lens, strict=True)])
    counts = np.bincount(drawn, minlength=len(seqs))
    assert (drawn != start).mean() > 0.3  # the kernel moves

    def p_value(probs):
        expected = reps * probs
        small = expected < 5
        obs, exp = counts[~small], expected[~small]
        if small.any():
            obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
        return stats.chisquare(obs, exp).pvalue

    assert p_value(target) > 1e-3
    assert p_value(prior) < 1e-3


def test_errors():
    with pytest.raises(ConfigError):
        rs.ParticleGibbs(1, 2)
    with pytest.raises(ConfigError):
        rs.ParticleGibbs(4, 0)
    with pytest.raises(ConfigError):
        rs.ParticleGibbs(4, 2, weights="softmax")
    with pytest.raises(ConfigError):
        rs.ParticleGibbs(4, 2, answer="median")
    with pytest.raises(ConfigError):
        rs.conditional_resampling(True, "nope")
    spec = rs.StepSpec(decode=decode, delimiters=(DOT,), eos_id=EOS)
    with pytest.raises(ConfigError, match="process reward"):
        rs.pinned_program(spec)


# --------------------------------------------------------------------------- what the benchmark relies on


def test_samples_do_not_depend_on_the_particle_count():
    """A particle's trajectory depends on the key and its index only: the first n samples of
    Sampling(m) are Sampling(n)'s (the benchmark computes best-of-n and votes from one pool of 64)."""
    program, args = setup(PROBS, lambda q, s: 0.5, max_chunk=3, max_steps=3)
    small = pp.infer(program, args, algorithm=rs.Sampling(4), key=5).extras["solutions"]
    large = pp.infer(program, args, algorithm=rs.Sampling(9), key=5).extras["solutions"]
    assert small == large[:4] and len(set(large)) > 1


def test_particle_filter_answer_rules_share_the_particles():
    """ParticleFilter(answer="vote") and ("argmax") with the same key run the same particles (the
    benchmark reads pf_argmax off the pf run)."""
    program, args = setup(PROBS, prm, max_chunk=3, max_steps=3)
    vote = pp.infer(program, args, algorithm=rs.ParticleFilter(6), key=2)
    best = pp.infer(program, args, algorithm=rs.ParticleFilter(6, answer="argmax"), key=2)
    assert vote.extras["solutions"] == best.extras["solutions"]
    top = int(np.argmax(np.asarray(vote.samples["score"])))
    assert best.extras["answer"] == vote.extras["answers"][top]
