"""The Feynman–Kac reasoning filter is valid: on a tiny exact bigram LM, E[Ẑ] = Z, with Z computed by
enumerating every chunked solution, for ESS thresholds 0 (importance sampling), 0.5 and 1."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppinfer as pp
from ppinfer import reasoning as rs
from ppinfer.algorithms.smc import run_loop
from ppinfer.lm import NGramLM
from semantics.stats import check_unbiased_evidence

EOS, A, B, DOT = 0, 1, 2, 3
CHARS = {A: "a", B: "b", DOT: "."}
PROBS = np.array(
    [
        [0.10, 0.40, 0.30, 0.20],  # after EOS (the prompt)
        [0.20, 0.30, 0.20, 0.30],  # after "a"
        [0.15, 0.25, 0.35, 0.25],  # after "b"
        [0.20, 0.40, 0.30, 0.10],  # after "."
    ]
)
MAX_CHUNK, MAX_STEPS, TAU, CLIP = 2, 3, 0.7, 1e-3


def decode(ids):
    return "".join(CHARS.get(int(i), "") for i in ids)


def prm(question, solution):
    return (1.0 + solution.count("a")) / (2.0 + len(solution))


def phi(r):
    r = min(max(r, CLIP), 1 - CLIP)
    return np.log(r / (1 - r)) / TAU


def chunks(prev):
    """Every chunk after token ``prev``: (tokens, probability)."""
    for length in range(1, MAX_CHUNK + 1):
        for toks in itertools.product(range(4), repeat=length):
            ends = [t in (DOT, EOS) for t in toks]
            if any(ends[:-1]) or (length < MAX_CHUNK and not ends[-1]):
                continue
            context = (prev, *toks)
            yield toks, float(np.prod([PROBS[a, b] for a, b in itertools.pairwise(context)]))


def exact_log_z(telescoping=True):
    """log Σ_x p_LM(x) · G(x): G = exp φ(r_final) (the Feynman–Kac target), or the product of the
    per-step potentials exp Σ_t φ(r_t) (the target Puri et al.'s weights would imply)."""

    def total(prev, text, step, log_g):
        z = 0.0
        for toks, prob in chunks(prev):
            new = text + decode(toks)
            g = phi(prm("", new)) if telescoping else log_g + phi(prm("", new))
            if toks[-1] == EOS or step + 1 == MAX_STEPS:
                z += prob * np.exp(g)
            else:
                z += prob * total(toks[-1], new, step + 1, g)
        return z

    return float(np.log(total(EOS, "", 0, 0.0)))


def test_exact_enumeration_is_a_distribution():
    probs = [p for _, p in chunks(A)]
    assert sum(probs) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def program_and_args():
    lm = NGramLM.from_probs(PROBS, bos_id=EOS)
    spec = rs.StepSpec(
        decode=decode, delimiters=(DOT,), eos_id=EOS, max_chunk=MAX_CHUNK, max_steps=MAX_STEPS,
        prm=prm, clip=CLIP,
    )
    return rs.reasoning_program(spec, "fk", TAU), (rs.question_args(lm, spec, [EOS]),)


def replicate_log_z(program, args, threshold, num_replicates=3000, num_particles=3):
    """log Ẑ of ``num_replicates`` runs of the Feynman–Kac filter's loop (``run_loop`` of
    ``FeynmanKacFilter.loop``: SMC on ``program`` with ESS-adaptive systematic resampling)."""
    loop = rs.FeynmanKacFilter(num_particles, TAU, ess_threshold=threshold).loop(program, args)

    @jax.jit
    def run(keys):
        return jax.vmap(lambda k: run_loop(k, program, args, loop)["log_evidence"])(keys)

    return np.asarray(run(jax.random.split(jax.random.PRNGKey(7), num_replicates)))


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_feynman_kac_filter_unbiased_evidence(program_and_args, threshold):
    log_z_hats = replicate_log_z(*program_and_args, threshold)
    check = check_unbiased_evidence(log_z_hats, exact_log_z())
    assert check.passed, check
    # the check has power: the non-telescoping target of Puri et al.'s weights is rejected
    assert abs(exact_log_z(telescoping=False) - exact_log_z()) > 0.3
    assert not check_unbiased_evidence(log_z_hats, exact_log_z(telescoping=False)).passed


def test_a_filter_that_does_not_subtract_the_previous_potential_fails(program_and_args):
    """The broken variant: an incremental weight ``φ(r_t)`` instead of ``φ(r_t) − φ(r_{t−1})`` (the
    step adds back the previous potential). Its Ẑ estimates the non-telescoping Z, and the same
    check rejects it against the Feynman–Kac Z."""
    program, args = program_and_args

    def step(state, t, a):
        pp.factor("previous", jnp.where(state.finished, 0.0, state.potential))
        return program.step(state, t, a)

    broken = dataclasses.replace(program, step=step)
    log_z_hats = replicate_log_z(broken, args, 0.5)
    assert not check_unbiased_evidence(log_z_hats, exact_log_z()).passed
    assert check_unbiased_evidence(log_z_hats, exact_log_z(telescoping=False)).passed
