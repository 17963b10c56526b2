"""Step-level reasoning programs and inference-time scaling as inference (after Puri et al. 2025,
"A Probabilistic Inference Approach to Inference-Time Scaling of LLMs using Particle-Based Monte
Carlo Methods").

Reasoning is a state-space model whose state is the LM context (the steps so far). One step of the
program generates one **chunk** of tokens from the LM, ending at a step delimiter token (e.g. ``"."``
closing ``" Step: 5*3=15."``), at EOS (the end of the answer ``" A: 32"``), or after ``max_chunk``
tokens — an inner ``lax.while_loop`` over tokens inside ONE SMC step, vmapped over particles. The
program ends at EOS or after ``max_steps`` chunks.

A **reward** is a Python function ``reward(question, solution) -> float in [0, 1]`` evaluated on the
host from the decoded text, batched over particles (one host call per step): a process reward model
(PRM) scores a partial solution, an outcome reward model (ORM) a finished one. Offline rewards for
the synthetic arithmetic task of the embedded model: :func:`arithmetic_prm` (every completed step
``a op b=c`` holds and the answer is the last step's result), :func:`arithmetic_orm` (the answer is
correct) and :func:`noisy` (a verifier wrong at a set rate).

A reward ``r`` becomes a log potential ``φ(r) = logit(clip(r, ε, 1 − ε)) / τ``; clipping keeps a
rejected particle's weight positive (tiny), so a population is never all dead.

Algorithms (``infer(program, *args, algorithm=...)`` with ``program = reasoning_program(...)``,
``args = question_args(...)``), all reporting the same compute accounting in ``Result.extras``:
``generated_tokens`` (tokens the LM generated, over every particle ever alive) and ``reward_calls``
(reward evaluations, during generation and at selection). Each is a configuration of the one SMC
loop (:func:`ppinfer.algorithms.smc.run_loop` over :func:`ppinfer.kernels.smc.step`): a program
variant (``"fk"`` or ``"plain"``, :func:`reasoning_program`) and a selection
(:mod:`ppinfer.kernels.select`) after every step but the last:

- :class:`FeynmanKacFilter` — the PRM's potentials as a Feynman–Kac model: the incremental weight
  at step t is ``G_t = exp(φ(r_t) − φ(r_{t−1}))`` (``φ(r_0) = 0``), so the weights telescope and
  the target is ``p_LM(x) · exp(φ(r(x)))`` for the final reward ``r(x)``; ``log_evidence`` is an
  unbiased (in ``exp``) estimate of ``Z = E_LM[exp φ(r(x))]``. The ``"fk"`` program with
  ESS-adaptive resampling: ``pp.SMC`` itself (a chunk is drawn from the step's key, through
  ``numpyro.prng_key``, not at a latent sample site, and core SMC accepts that).
- :class:`ParticleFilter` — Puri et al.'s filter: after each step the weights are
  ``softmax_i φ(r_t^i)`` (the PRM score of the partial solution *replaces* the weight) and the
  population is resampled every step; answer by weighted vote or argmax. The ``"fk"`` program,
  whose weight is ``φ(r_t) − log N``, with resampling that keeps each copy's weight its parent's
  (:class:`~ppinfer.kernels.select.ParentWeights`).
- :class:`BeamSearch` — step-level beam search: keep the ``N / expand`` particles with the best
  current PRM score, copy each ``expand`` times (:class:`~ppinfer.kernels.select.Beam`).
- :class:`ParticleGibbs` — particle Gibbs iterations: conditional SMC sweeps, each keeping a
  reference trajectory pinned in slot 0 (teacher-forced, :func:`generate_chunk` with ``forced``;
  :class:`~ppinfer.kernels.select.Conditional` resampling) and drawing the next reference from the
  final weights; with Feynman–Kac weights the chain of references leaves
  ``p_LM(x) · exp φ(r(x)) / Z`` invariant.
- :class:`BestOfN` — N independent samples, the one with the highest outcome reward.
- :class:`MajorityVote` — self-consistency: N samples, answer with the largest (reward-weighted)
  vote.
- :class:`Sampling` — plain sampling: one answer from N samples (the first). These three run the
  ``"plain"`` program without selection (:data:`INDEPENDENT`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.primitives import prng_key

from ppinfer import checks
from ppinfer._compile import cached_jit, split_args
from ppinfer.algorithms.smc import Loop, run_chunked, smc_selection
from ppinfer.errors import ConfigError, DataError, ModelError, ZeroEvidenceError
from ppinfer.kernels import smc as kernel
from ppinfer.kernels.select import (
    Adaptive,
    Beam,
    Conditional,
    Multinomial,
    ParentWeights,
    Systematic,
    as_selection,
)
from ppinfer.kernels.smc import SMCInfo, SMCState, scan_while
from ppinfer.primitives import deterministic, factor, stop
from ppinfer.program import SequentialProgram
from ppinfer.result import Result
from ppinfer.tokens import Context, LMPrompt

__all__ = [
    "Reward",
    "StepSpec",
    "ReasoningState",
    "ReasoningArgs",
    "ReasoningProgram",
    "reasoning_program",
    "question_args",
    "generate_chunk",
    "reward_values",
    "potential",
    "check_reward",
    "PROBE_QUESTION",
    "account",
    "reasoning_loop",
    "INDEPENDENT",
    "weighted_vote",
    "arithmetic_prm",
    "arithmetic_orm",
    "expected_answer",
    "parse_answer",
    "noisy",
    "NoisyReward",
    "ParticleFilter",
    "FeynmanKacFilter",
    "BeamSearch",
    "BestOfN",
    "MajorityVote",
    "Sampling",
    "ParticleGibbs",
    "PinnedState",
    "pinned_program",
    "pin",
    "conditional_resampling",
    "conditional_sweep",
    "selection_logits",
]

Reward = Callable[[str, str], float]
"""``reward(question, solution) -> float in [0, 1]``: ``solution`` is the generated text so far."""


# --------------------------------------------------------------------------------------------------
# Rewards (host side)
# --------------------------------------------------------------------------------------------------

_STEP = re.compile(r"\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*\.\s*")
_QUESTION = re.compile(r"Q:\s*([0-9+\-*\s]+?)\s*=\s*\?")


def arithmetic_prm(question: str, solution: str) -> float:
    """Exact process reward for the arithmetic format ``" Step: a op b=c. … A: c"``: 1.0 when every
    *completed* step (one ending with ``"."``) is well formed and its arithmetic holds and, once an
    answer ``"A: x"`` is present, at least one step precedes it and ``x`` is the last step's result;
    0.0 otherwise. An unfinished trailing step is not judged yet. ``question`` is not used (the check
    is local: it does not test that the steps reduce the question's expression)."""
    del question
    body, marker, answer = solution.partition("A:")
    pieces = body.split("Step:")
    if pieces[0].strip():
        return 0.0
    last = None
    for k, piece in enumerate(pieces[1:]):
        closed = piece.rstrip().endswith(".")
        if not closed:
            if marker or k < len(pieces) - 2:
                return 0.0
            continue
        match = _STEP.fullmatch(piece)
        if match is None:
            return 0.0
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        if _apply(a, op, b) != c:
            return 0.0
        last = c
    if marker:
        value = parse_answer(solution)
        if last is None or value is None or value != last:
            return 0.0
    return 1.0


def arithmetic_orm(question: str, solution: str) -> float:
    """Exact outcome reward: 1.0 when the answer after ``"A:"`` equals the value of the question's
    expression (``*`` before ``+``/``-``, left to right), 0.0 otherwise (no answer, or a question
    that is not ``"Q: <expression> = ?"``)."""
    truth = expected_answer(question)
    return float(truth is not None and parse_answer(solution) == truth)


def expected_answer(question: str) -> int | None:
    """The value of the expression in ``"Q: 17+5*3 = ?"`` (``*`` first, then ``+``/``-`` left to
    right, as in ``models/arith_corpus.py``), or None when the question does not parse."""
    match = _QUESTION.search(question)
    if match is None:
        return None
    parts = re.findall(r"\d+|[+\-*]", match[1])
    if len(parts) % 2 == 0 or any(p.isdigit() != (i % 2 == 0) for i, p in enumerate(parts)):
        return None
    values, ops = [int(p) for p in parts[::2]], parts[1::2]
    for kinds in (("*",), ("+", "-")):
        i = 0
        while i < len(ops):
            if ops[i] in kinds:
                values[i : i + 2] = [_apply(values[i], ops[i], values[i + 1])]
                del ops[i]
            else:
                i += 1
    return values[0]


def parse_answer(solution: str) -> int | None:
    """The integer after ``"A:"`` in a solution, or None when it is missing or malformed."""
    _, marker, rest = solution.partition("A:")
    token = rest.strip().split(" ")[0] if marker else ""
    try:
        return int(token)
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class NoisyReward:
    """A deliberately imperfect verifier: ``reward``'s score flipped (``r → 1 − r``) with
    probability ``rate``. The flip is a deterministic, seeded hash of ``(seed, question, solution)``:
    the same text always gets the same score (like a fixed imperfect model) and different texts
    flip independently at rate ``rate``."""

    reward: Reward
    rate: float
    seed: int = 0

    def flips(self, question: str, solution: str) -> bool:
        """Whether the score of this text is flipped."""
        digest = hashlib.blake2b(f"{self.seed}\x00{question}\x00{solution}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "little") / 2.0**64 < self.rate

    def __call__(self, question: str, solution: str) -> float:
        r = float(self.reward(question, solution))
        return 1.0 - r if self.flips(question, solution) else r


def noisy(reward: Reward, rate: float, seed: int = 0) -> NoisyReward:
    """``reward`` flipped at rate ``rate`` (see :class:`NoisyReward`)."""
    checks.check_probability("rate", rate)
    if not callable(reward):
        raise ConfigError(f"reward must be a callable (question, solution) -> float, got {reward!r}")
    return NoisyReward(reward, float(rate), int(seed))


def _apply(a: int, op: str, b: int) -> int:
    return a * b if op == "*" else a + b if op == "+" else a - b


# --------------------------------------------------------------------------------------------------
# The step-level program
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a reasoning step is, and the process reward.

    Attributes:
        decode: ``decode(ids) -> str`` (the tokenizer's; EOS is removed before decoding).
        delimiters: token ids that end a step (the delimiter is part of the step).
        eos_id: the token that ends the solution.
        max_chunk: most tokens in one step (a step is cut there if no delimiter came).
        max_steps: most steps; the context holds ``max_steps · max_chunk`` generated tokens.
        prm: the process reward ``prm(question, solution) -> [0, 1]`` (None: no PRM).
        temperature: the LM's sampling temperature; the program's prior is the LM at this
            temperature (no importance correction: temperature defines the base model).
        clip: ε of the potential ``φ(r) = logit(clip(r, ε, 1 − ε)) / τ``.
    """

    decode: Callable[[Sequence[int]], str]
    delimiters: tuple[int, ...]
    eos_id: int
    max_chunk: int = 16
    max_steps: int = 6
    prm: Reward | None = None
    temperature: float = 1.0
    clip: float = 1e-3

    def __post_init__(self):
        if not callable(self.decode):
            raise ConfigError("decode must be a callable ids -> str")
        if not isinstance(self.delimiters, tuple | list) or not self.delimiters:
            raise ConfigError(f"delimiters must be a non-empty tuple of token ids, got {self.delimiters!r}")
        for k, token in enumerate(self.delimiters):
            checks.check_int(f"delimiters[{k}]", token, 0)
        checks.check_int("eos_id", self.eos_id, 0)
        for name in ("max_chunk", "max_steps"):
            checks.check_int(name, getattr(self, name), 1)
        if self.prm is not None and not callable(self.prm):
            raise ConfigError(f"prm must be a callable (question, solution) -> float, got {self.prm!r}")
        from ppinfer.tokens import check_temperature

        check_temperature(self.temperature)
        if not 0 < self.clip < 0.5:
            raise ConfigError(f"clip must be in (0, 0.5), got {self.clip}")

    @property
    def max_new_tokens(self) -> int:
        return int(self.max_chunk) * int(self.max_steps)


class ReasoningState(NamedTuple):
    """One particle's state (a population adds a leading axis N to every leaf).

    Attributes:
        ctx: the LM :class:`~ppinfer.tokens.Context` (the steps so far, as tokens).
        num_steps: ``i32[]`` completed steps.
        finished: ``bool[]`` the solution ended (EOS, or the context is full).
        score: ``f32[]`` the PRM score ``r_t`` of the solution so far (1 before any step, and in a
            program without PRM).
        potential: ``f32[]`` ``φ(r_t)`` (0 before any step): the Feynman–Kac twist carried so that
            the next step's incremental weight is ``φ(r_{t+1}) − φ(r_t)``.
    """

    ctx: Context
    num_steps: jax.Array
    finished: jax.Array
    score: jax.Array
    potential: jax.Array


class ReasoningArgs(NamedTuple):
    """The program's arguments for one question.

    Attributes:
        prompt: the :class:`~ppinfer.tokens.LMPrompt` (the question run once through the LM).
        question: ``i32[Lq]`` the question's token ids (right-padded), given to rewards as text.
        question_length: ``i32[]`` real tokens in ``question``.
    """

    prompt: LMPrompt
    question: jax.Array
    question_length: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class ReasoningProgram(SequentialProgram):
    """A step-level reasoning program: a :class:`~ppinfer.SequentialProgram` (its own target is the
    Feynman–Kac one of ``weighting="fk"``) plus its :class:`StepSpec`, from which the algorithms of
    this module build the variant they need. Its chunk is drawn with a ``numpyro.prng_key`` inside
    the step (no latent ``sample`` site: the extended KV cache is the step's product); the core
    ``pp.SMC`` accepts such a step as random, and on the ``"fk"`` program it is
    :class:`FeynmanKacFilter`."""

    spec: StepSpec | None = None
    weighting: str = "fk"
    tau: float = 1.0


WEIGHTINGS = ("plain", "fk")


def reasoning_program(spec: StepSpec, weighting: str = "fk", tau: float = 1.0) -> ReasoningProgram:
    """The step-level program of ``spec`` (cached: the same arguments give the same object, so
    compiled code is reused). ``init(args)`` is the empty solution; ``step(state, t, args)``
    generates one chunk from the LM and then, by ``weighting``:

    - ``"plain"``: no reward call, no weight (the LM prior; used by sampling, BoN, vote);
    - ``"fk"``: calls the PRM on the solution so far, stores ``r_t`` and ``φ(r_t)`` in the state and
      adds the incremental log weight ``φ(r_t) − φ(r_{t−1})`` (``φ(r_0) = 0``), so the weights
      telescope to ``φ(r_final)``: the log weight of a particle is ``φ(r_t) − log N`` until a
      selection changes it. Puri et al.'s filter and beam search run this program too, with
      selections that keep each copy's weight its parent's, so that it stays the current score.

    Each step records the deterministic site ``"chunk_tokens"`` (``i32[]``, tokens generated)."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if weighting != "plain" and spec.prm is None:
        raise ConfigError(f"weighting={weighting!r} needs a process reward (StepSpec(prm=...))")
    if not tau > 0:
        raise ConfigError(f"tau must be > 0, got {tau}")
    if weighting == "plain":  # one program for every reward: it never calls one
        spec, tau = dataclasses.replace(spec, prm=None), 1.0
    return _program(spec, weighting, float(tau))


@functools.lru_cache(maxsize=64)
def _program(spec: StepSpec, weighting: str, tau: float) -> ReasoningProgram:
    def init(args: ReasoningArgs) -> ReasoningState:
        return _initial_state(args)

    def step(state: ReasoningState, t: jax.Array, args: ReasoningArgs) -> ReasoningState:
        return _reasoning_step(spec, weighting, tau, state, args)

    return ReasoningProgram(init, step, spec.max_steps, spec, weighting, tau)


def _initial_state(args: ReasoningArgs) -> ReasoningState:
    one = jnp.ones((), jnp.float32)
    zero_steps, unfinished = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
    return ReasoningState(Context.start(args.prompt), zero_steps, unfinished, one, 0.0 * one)


def _reasoning_step(
    spec: StepSpec,
    weighting: str,
    tau: float,
    state: ReasoningState,
    args: ReasoningArgs,
    reference: jax.Array | None = None,
    forced: jax.Array | bool = False,
) -> ReasoningState:
    """One step of the program (see :func:`reasoning_program`); with ``forced`` the chunk's tokens
    are ``reference``'s instead of sampled ones (the pinned particle of :class:`ParticleGibbs`)."""
    p = args.prompt
    active = ~state.finished
    ctx, ended = generate_chunk(
        prng_key(),
        state.ctx,
        p,
        tuple(int(d) for d in spec.delimiters),
        spec.eos_id,
        spec.max_chunk,
        active,
        spec.temperature,
        reference,
        forced,
    )
    deterministic("chunk_tokens", ctx.length - state.ctx.length)
    finished = state.finished | ended | (ctx.length >= ctx.tokens.shape[0])
    score, phi = state.score, state.potential
    if weighting != "plain":
        r = reward_values(
            spec.prm, spec.decode, spec.eos_id, args.question, args.question_length, ctx, active
        )
        score = jnp.where(active, r, state.score)
        phi = jnp.where(active, potential(score, spec.clip, tau), state.potential)
        factor("potential", phi - state.potential)
    stop(finished)
    return ReasoningState(ctx, state.num_steps + active.astype(jnp.int32), finished, score, phi)


def question_args(
    lm: Any, spec: StepSpec, question: str | Sequence[int], pad_to: int | None = None
) -> ReasoningArgs:
    """Run ``question`` (text, or token ids; prefix it with BOS/EOS as the model was trained) through
    ``lm`` once.
    With ``pad_to`` the prompt is right-padded to that many tokens so that questions of different
    lengths share one compiled program (needs an LM whose ``prefill`` takes ``length``, as the
    transformer's does)."""
    vocab = getattr(lm, "vocab_size", None) or getattr(getattr(lm, "config", None), "vocab_size", None)
    outside = [i for i in (spec.eos_id, *spec.delimiters) if vocab is not None and i >= vocab]
    if outside:
        raise ConfigError(f"the StepSpec's eos_id/delimiters {outside} lie outside the vocabulary of {vocab}")
    if pad_to is not None and "length" not in inspect.signature(lm.prefill).parameters:
        raise ConfigError(f"pad_to needs an LM whose prefill takes a length (the transformer's); got {lm!r}")
    ids = np.asarray(lm.encode(question) if isinstance(question, str) else question, np.int32)
    n = int(ids.shape[0])
    if n < 1:
        raise ModelError("the question must be at least one token")
    if pad_to is not None and n > pad_to:
        raise ConfigError(f"the question has {n} tokens, more than pad_to={pad_to}")
    width = n if pad_to is None else int(pad_to)
    padded = jnp.asarray(np.pad(ids, (0, width - n)), jnp.int32)
    if pad_to is None:
        logits, cache = lm.prefill(padded)
    else:
        logits, cache = lm.prefill(padded, jnp.asarray(n, jnp.int32))
    first = jax.nn.log_softmax(logits[n - 1].astype(jnp.float32))
    p = LMPrompt(lm, cache, first, spec.max_new_tokens, spec.eos_id)
    return ReasoningArgs(p, padded, jnp.asarray(n, jnp.int32))


def generate_chunk(
    key: jax.Array,
    ctx: Context,
    p: LMPrompt,
    delimiters: tuple[int, ...],
    eos_id: int,
    max_chunk: int,
    active: jax.Array | bool = True,
    temperature: float = 1.0,
    reference: jax.Array | None = None,
    forced: jax.Array | bool = False,
) -> tuple[Context, jax.Array]:
    """Sample one step for ONE particle: tokens from the LM (at ``temperature``) until a delimiter
    or EOS (included) or ``max_chunk`` tokens or a full context; nothing when ``active`` is False.
    A ``lax.while_loop`` over tokens (vmapped, it runs until every particle's chunk is done).
    With ``forced`` (``bool[]``) the tokens are not sampled but read from ``reference: i32[T]`` at
    the context's positions (teacher forcing): the same stopping rule then reproduces exactly the
    chunk that ``reference`` was generated with.
    Returns the extended context and ``ended: bool[]``, whether the chunk ended with EOS."""
    delims = jnp.asarray(delimiters, jnp.int32)
    capacity = ctx.tokens.shape[0]

    def cond(carry):
        i, c, done = carry
        return ~done & (i < max_chunk) & (c.length < capacity)

    def body(carry):
        i, c, _ = carry
        logits = jnp.maximum(c.logp / temperature, -1e30)
        tok = jax.random.categorical(jax.random.fold_in(key, i), logits).astype(jnp.int32)
        if reference is not None:
            tok = jnp.where(forced, reference[jnp.minimum(c.length, capacity - 1)], tok)
        return i + 1, c.extend(p, tok), jnp.any(tok == delims) | (tok == eos_id)

    start_done = ~jnp.asarray(active, bool)
    i, ctx, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), ctx, start_done))
    last = ctx.tokens[jnp.maximum(ctx.length - 1, 0)]
    return ctx, (i > 0) & (last == eos_id)


def reward_values(
    reward: Reward,
    decode: Callable[[Sequence[int]], str],
    eos_id: int,
    question: jax.Array,
    question_length: jax.Array,
    ctx: Context,
    when: jax.Array | bool = True,
) -> jax.Array:
    """``f32[]``: ``reward(question_text, solution_text)`` of ONE particle, computed on the host where
    ``when`` holds (1.0 elsewhere, without a call). Under ``vmap`` the host receives the whole batch:
    one call per step. A reward that raises, or returns anything but a number in [0, 1] (NaN, a
    string, an array; round-off past the ends is clipped), stops the run, and
    :func:`ppinfer.infer` raises a :class:`ModelError` naming the solution (from the run that
    called the reward: two runs in two threads never see each other's errors)."""

    def host(q, qlen, toks, lens, whens):
        q, qlen, toks, lens, whens = (np.asarray(x) for x in (q, qlen, toks, lens, whens))
        shape = np.broadcast_shapes(qlen.shape, lens.shape, whens.shape, q.shape[:-1], toks.shape[:-1])
        flat = lambda x, tail: np.broadcast_to(x, shape + tail).reshape((-1, *tail))
        qs, qls = flat(q, q.shape[-1:]), flat(qlen, ())
        ts, ls, ws = flat(toks, toks.shape[-1:]), flat(lens, ()), flat(whens, ())
        out = np.ones(ws.shape, np.float32)
        for j in np.flatnonzero(ws):
            question_text = decode([int(x) for x in qs[j][: qls[j]]])
            solution = decode([int(x) for x in ts[j][: ls[j]] if x != eos_id])
            out[j] = score(reward, "process reward", question_text, solution)  # an error stops the run
        return out.reshape(shape)

    when = jnp.asarray(when, bool)
    shape = jax.ShapeDtypeStruct(
        jnp.broadcast_shapes(jnp.shape(question_length), jnp.shape(ctx.length), jnp.shape(when)),
        jnp.float32,
    )
    return jax.pure_callback(
        host, shape, question, question_length, ctx.tokens, ctx.length, when, vmap_method="expand_dims"
    )


def potential(r: jax.Array, clip: float, tau: float) -> jax.Array:
    """``φ(r) = logit(clip(r, ε, 1 − ε)) / τ``, the log potential of a reward ``r ∈ [0, 1]``."""
    r = jnp.clip(r, clip, 1.0 - clip)
    return (jnp.log(r) - jnp.log1p(-r)) / tau


PROBE_QUESTION = "Q: 1+1 = ?"


def check_reward(reward: Reward, name: str) -> None:
    """Call ``reward`` once (on :data:`PROBE_QUESTION` and an empty solution) and raise
    :class:`ModelError` unless it returns a number in [0, 1] (errors inside the compiled run's host
    callback would surface as JAX errors)."""
    score(reward, name, PROBE_QUESTION, "")  # the tolerance of the run's own calls


def score(reward: Reward, what: str, question: str, solution: str) -> float:
    """``reward(question, solution)`` as a score in [0, 1] (round-off past the ends clipped); a
    :class:`ModelError` naming the solution if the reward raises or returns anything else."""
    try:
        value = reward(question, solution)
    except Exception as e:
        raise ModelError(f"the {what} failed on solution {solution!r}: {type(e).__name__}: {e}") from e
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not -1e-6 <= v <= 1.0 + 1e-6:  # NaN too
        raise ModelError(
            f"the {what} returned {value!r} on solution {solution!r}: a reward is a number in [0, 1]"
        )
    return min(max(v, 0.0), 1.0)


# --------------------------------------------------------------------------------------------------
# Algorithms: configurations of the one SMC loop (a program variant and a selection)
# --------------------------------------------------------------------------------------------------

ANSWER_RULES = ("vote", "argmax")

INDEPENDENT = Adaptive(Systematic(), 0.0)
"""The selection of independent samples: its trigger (``ESS < 0``) never holds, so the loop never
selects nor gathers."""


def account(state: SMCState, info: SMCInfo) -> dict:
    """One step's compute accounting (a :class:`~ppinfer.algorithms.smc.Loop` recorder): ``tokens:
    i32[]`` the tokens generated by the particles that ran the step and ``running: i32[]`` how many
    ran (each called the PRM once when the program is scored). A step not run records zeros."""
    del state
    tokens = jnp.sum(jnp.where(info.active, info.choices["chunk_tokens"], 0))
    return {"tokens": tokens, "running": jnp.sum(info.active.astype(jnp.int32))}


def reasoning_loop(program: ReasoningProgram, args: tuple, num_particles: int, selection: Any) -> Loop:
    """The :class:`~ppinfer.algorithms.smc.Loop` of a step-level algorithm: ``selection`` after
    every step but the last, until every particle finished (early exit), no per-step history, the
    compute accounting recorded (:func:`account`). Valid whenever ``selection`` is."""
    return Loop(num_particles, program.steps_for(args), selection, history=False, record=account)


@dataclasses.dataclass(frozen=True)
class ParticleFilter:
    """Particle filtering as in Puri et al. (2025): ``N`` particles advance one step each; the PRM
    scores every partial solution; before the next step the population is resampled with
    probabilities ``softmax_i(φ(r_t^i))``, ``φ(r) = logit(clip(r)) / tau``. Final answer by
    ``answer="vote"`` (``Σ`` normalised weights per distinct answer) or ``"argmax"`` (the particle
    with the highest final score). ``Result.log_weights`` are ``φ(r_final) − log N`` (weights of the
    final selection, not an evidence estimate: ``log_evidence`` is ``None``). The ``"fk"`` program's
    weight is ``φ(r_t) − log N`` (the increments telescope; a finished particle keeps its last
    score): resampling by weight is by ``softmax φ(r_t)``, and ``ParentWeights`` keeps it so."""

    num_particles: int = 16
    tau: float = 1.0
    answer: str = "vote"
    resampling: str = "multinomial"
    answer_parser: Callable[[str], Any] = parse_answer

    name = "ParticleFilter"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        _check_answer_rule(self.answer)
        as_selection(self.resampling)
        _check_tau(self.tau)

    def loop(self, program: ReasoningProgram, args: tuple) -> Loop:
        return reasoning_loop(program, args, self.num_particles, ParentWeights(as_selection(self.resampling)))

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        prog = reasoning_program(_spec_of(program, args), "fk", self.tau)
        run = _run(key, prog, args, self.loop(prog, args))
        phi = run.out["state"].potential
        return _finish(self, run, phi - jnp.log(self.num_particles), None, self.answer, phi)


@dataclasses.dataclass(frozen=True)
class FeynmanKacFilter:
    """The same potentials as a proper Feynman–Kac model: the program multiplies the weight at step
    ``t`` by ``G_t = exp(φ(r_t) − φ(r_{t−1}))`` (``φ(r_0) = 0``), so the cumulative weight of a
    finished particle is ``exp(φ(r_final)) / N`` and the target is ``p_LM(x) · exp φ(r(x))``;
    resampling (``resampling``) when ``ESS < ess_threshold · N``. ``log_evidence`` is the log of an
    unbiased estimate of ``Z = E_LM[exp φ(r(x))]``; ``Result.log_weights`` are the cumulative log
    weights. Answer by weighted vote or argmax weight. The same loop and selection as
    ``pp.SMC(N, resampling, ess_threshold)`` on the ``"fk"`` program."""

    num_particles: int = 16
    tau: float = 1.0
    ess_threshold: float = 0.5
    answer: str = "vote"
    resampling: str = "systematic"
    answer_parser: Callable[[str], Any] = parse_answer

    name = "FeynmanKacFilter"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        checks.check_probability("ess_threshold", self.ess_threshold)
        _check_answer_rule(self.answer)
        as_selection(self.resampling)
        _check_tau(self.tau)

    def loop(self, program: ReasoningProgram, args: tuple) -> Loop:
        selection = smc_selection(self.resampling, self.ess_threshold)
        return reasoning_loop(program, args, self.num_particles, selection)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        prog = reasoning_program(_spec_of(program, args), "fk", self.tau)
        run = _run(key, prog, args, self.loop(prog, args))
        lw = run.out["log_weights"]
        log_z = float(run.out["log_evidence"])
        checks.raise_if_dead(log_z, "at the end", self.num_particles)
        return _finish(self, run, lw, log_z, self.answer, lw)


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """Step-level beam search with the PRM: after each step keep the ``max(1, N // expand)``
    particles with the best current score and copy each about ``expand`` times to refill the ``N``
    slots. Answer: the final particle with the highest score (ties: lowest index).
    ``Result.log_weights`` are ``φ(r_final) − log N``; ``log_evidence`` is ``None``. The ``"fk"``
    program's weight ``φ(r_t) − log N`` increases with the score: :class:`~ppinfer.kernels.select.Beam`
    keeps the top."""

    num_particles: int = 16
    expand: int = 4
    tau: float = 1.0
    answer_parser: Callable[[str], Any] = parse_answer

    name = "BeamSearch"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        checks.check_int("expand", self.expand, 1)
        _check_tau(self.tau)

    def loop(self, program: ReasoningProgram, args: tuple) -> Loop:
        keep = max(1, self.num_particles // int(self.expand))
        return reasoning_loop(program, args, self.num_particles, Beam(keep))

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        prog = reasoning_program(_spec_of(program, args), "fk", self.tau)
        run = _run(key, prog, args, self.loop(prog, args))
        state = run.out["state"]
        log_weights = state.potential - jnp.log(self.num_particles)
        return _finish(self, run, log_weights, None, "argmax", state.score)


@dataclasses.dataclass(frozen=True)
class BestOfN:
    """Best-of-N: ``N`` independent samples from the LM, then ``outcome(question, solution)`` on
    each (N reward calls); the answer is the highest-scoring sample's (ties: the first).
    ``Result.log_weights`` are ``−log N`` (independent prior samples, Ẑ = 1: ``log_evidence`` 0)."""

    num_particles: int = 16
    outcome: Reward = arithmetic_orm
    answer_parser: Callable[[str], Any] = parse_answer

    name = "BestOfN"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        _check_callable("outcome", self.outcome)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        check_reward(self.outcome, "outcome reward")
        return _sampled(self, key, program, args, self.outcome, "argmax")


@dataclasses.dataclass(frozen=True)
class MajorityVote:
    """Self-consistency: ``N`` independent samples; the answer with the largest total vote, each
    sample voting with weight ``reward(question, solution)`` (N reward calls), or 1 when ``reward``
    is None (plain majority vote, no reward call). ``Result.log_weights`` are ``−log N``."""

    num_particles: int = 16
    reward: Reward | None = None
    answer_parser: Callable[[str], Any] = parse_answer

    name = "MajorityVote"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        if self.reward is not None:
            _check_callable("reward", self.reward)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        if self.reward is not None:
            check_reward(self.reward, "vote reward")
        return _sampled(self, key, program, args, self.reward, "vote")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Plain sampling: ``N`` independent samples; the answer is the first sample's (the accuracy of
    one sample, whatever ``N``). ``Result.log_weights`` are ``−log N``."""

    num_particles: int = 1
    answer_parser: Callable[[str], Any] = parse_answer

    name = "Sampling"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        return _sampled(self, key, program, args, None, "first")


# --------------------------------------------------------------------------------------------------
# Particle Gibbs: conditional SMC sweeps around a reference trajectory
# --------------------------------------------------------------------------------------------------


class PinnedState(NamedTuple):
    """A particle of the conditional filter of :class:`ParticleGibbs`.

    Attributes:
        reasoning: the :class:`ReasoningState`.
        pinned: ``bool[]`` this particle is the reference: its chunks are teacher-forced from the
            reference's tokens instead of sampled.
    """

    reasoning: ReasoningState
    pinned: jax.Array


def pinned_program(spec: StepSpec, tau: float = 1.0) -> ReasoningProgram:
    """The ``"fk"`` program of ``spec`` (see :func:`reasoning_program`) with a pinnable particle:
    ``init(args, reference)`` and ``step(state, t, args, reference)`` take ``reference: i32[T]``
    (``T = spec.max_new_tokens``, the reference's generated tokens, zero-padded) and carry a
    :class:`PinnedState`. An unpinned particle is the ordinary program; a pinned one reads its
    tokens from ``reference`` (:func:`generate_chunk` with ``forced``), so, with the same stopping
    rule, it reproduces the reference's chunks, PRM scores, potentials and incremental weights
    exactly (for a reward that is a deterministic function of the text). Cached like
    :func:`reasoning_program`."""
    if spec.prm is None:
        raise ConfigError("particle Gibbs needs a process reward (StepSpec(prm=...))")
    _check_tau(tau)
    return _pinned_program(spec, float(tau))


@functools.lru_cache(maxsize=32)
def _pinned_program(spec: StepSpec, tau: float) -> ReasoningProgram:
    def init(args: ReasoningArgs, reference: jax.Array) -> PinnedState:
        del reference
        return PinnedState(_initial_state(args), jnp.zeros((), bool))

    def step(state: PinnedState, t: jax.Array, args: ReasoningArgs, reference: jax.Array) -> PinnedState:
        new = _reasoning_step(spec, "fk", tau, state.reasoning, args, reference, state.pinned)
        return PinnedState(new, state.pinned)

    return ReasoningProgram(init, step, spec.max_steps, spec, "fk", tau)


def pin(state: SMCState, has_reference: jax.Array | bool) -> SMCState:
    """Mark slot 0 of a population of :class:`PinnedState` (an :class:`~ppinfer.kernels.smc.SMCState`
    or a :class:`~ppinfer.population.Population`) as the reference when ``has_reference``
    (``bool[]``, may be traced) and every other slot as free."""
    flags = (jnp.arange(state.log_weights.shape[0]) == 0) & jnp.asarray(has_reference, bool)
    particles = state.particles._replace(state=state.particles.state._replace(pinned=flags))
    return state._replace(particles=particles)


PG_WEIGHTS = ("fk", "puri")


def selection_logits(state: SMCState, weights: str) -> jax.Array:
    """``f32[N]`` the log selection weights of a population of :class:`PinnedState`: the cumulative
    log weights (``"fk"``) or the current potentials ``φ(r_t)`` (``"puri"``)."""
    return state.log_weights if weights == "fk" else state.particles.state.reasoning.potential


def conditional_resampling(has_reference: jax.Array | bool, weights: str = "fk") -> Callable:
    """The selection of a conditional SMC sweep (:mod:`~ppinfer.kernels.select`'s protocol): when
    ``has_reference`` (``bool[]``), :class:`~ppinfer.kernels.select.Conditional` multinomial
    resampling (slot 0, the reference, is its own ancestor; the other ``N − 1`` ancestors are drawn
    i.i.d. ∝ weight: the kernel of Andrieu, Doucet & Holenstein 2010), else plain multinomial.
    ``"fk"``: the new weights are equal (``log Ẑ − log N``); ``"puri"``: the weights are the
    potentials ``φ(r_t) − log N`` of the ``"fk"`` program and each copy keeps its parent's
    (:class:`~ppinfer.kernels.select.ParentWeights`, as :class:`ParticleFilter`)."""
    check_weights(weights)
    free, conditional = Multinomial(), Conditional(Multinomial())
    if weights == "puri":
        free, conditional = ParentWeights(free), ParentWeights(conditional)
    return lambda u, lw: jax.lax.cond(jnp.asarray(has_reference, bool), conditional, free, u, lw)


def conditional_sweep(
    key: jax.Array,
    program: ReasoningProgram,
    args: tuple,
    num_particles: int,
    reference: jax.Array,
    has_reference: jax.Array | bool,
    weights: str = "fk",
) -> tuple[dict, jax.Array]:
    """One sweep of conditional SMC (pure; jit/vmap-able): the kernel step
    (:func:`ppinfer.kernels.smc.step`) of ``program`` (from :func:`pinned_program`) on ``args =
    (ReasoningArgs,)`` with ``num_particles`` particles and :func:`conditional_resampling` after
    every step but the last, until every particle finished; slot 0 is re-pinned (:func:`pin`) to
    ``reference: i32[T]`` before every step when ``has_reference: bool[]`` (so a copy of the
    reference in another slot runs free). Returns ``(out, index)``: ``out`` with run_loop's keys
    ``state`` (:class:`PinnedState` ``[N, …]``), ``log_weights``, ``ess``, ``resampled`` and
    ``records`` (:func:`account`; the pinned particle's forced tokens counted), and ``index: i32[]``
    of the next reference, drawn ``∝ exp selection_logits`` of the final population. With
    ``weights="fk"``, a reference distributed as ``π(x) ∝ p_LM(x) · exp φ(r_final(x))`` gives a next
    reference distributed as ``π`` (the particle Gibbs kernel is π-invariant;
    ``tests/test_reasoning_gibbs.py`` checks it exactly)."""
    args = (args[0], reference)
    num_steps = program.steps_for(args)
    k_init, k_loop, k_ref = jax.random.split(key, 3)
    select = conditional_resampling(has_reference, weights)
    state, _ = kernel.init(k_init, program, args, num_particles)

    def body(state, key_t):
        state = pin(state, has_reference)
        last = state.t >= num_steps - 1
        state, info = kernel.step(key_t, state, program, args, selection=select, select_now=~last)
        return state, {"ess": info.ess, "resampled": info.selected, **account(state, info)}

    alive = lambda state: jnp.any(~state.particles.done)
    state, records, _ = scan_while(body, state, jax.random.split(k_loop, num_steps), alive)
    state = pin(state, has_reference)
    out = {
        "state": state.particles.state,
        "log_weights": state.log_weights,
        "ess": records.pop("ess"),
        "resampled": records.pop("resampled"),
        "records": records,
    }
    return out, jax.random.categorical(k_ref, selection_logits(state, weights))


def check_weights(weights: str) -> None:
    if weights not in PG_WEIGHTS:
        raise ConfigError(f"unknown particle Gibbs weights {weights!r}; choose one of {PG_WEIGHTS}")


@dataclasses.dataclass(frozen=True)
class ParticleGibbs:
    """Particle Gibbs iterations (Andrieu, Doucet & Holenstein 2010; Puri et al. 2025, Alg. 2):
    ``num_iterations`` sweeps of a filter with ``num_particles`` particles and multinomial
    resampling after every step but the last. The first sweep is unconditional; at the end of each
    sweep a reference trajectory is drawn from the final particles with probability
    ``∝ exp(selection_logits)``; every later sweep is *conditional* SMC: slot 0 is pinned to the
    reference (its tokens teacher-forced, its ancestor itself at every resampling, see
    :func:`conditional_resampling`) and the other ``N − 1`` particles are generated afresh and
    may resample from it.

    ``weights="fk"`` (default): the incremental weights ``φ(r_t) − φ(r_{t−1})`` of
    :class:`FeynmanKacFilter`, so the chain of references is a valid MCMC chain (a
    π-invariant kernel) for ``π(x) ∝ p_LM(x) · exp φ(r_final(x))``. ``weights="puri"``: Puri et
    al.'s selection ``softmax_i φ(r_t^i)`` (their PF with a reference; its implied target also
    counts the potential of an early-finished solution once per later selection).

    Answer from the final sweep: ``"vote"`` (``Σ`` normalised selection weights per distinct
    answer) or ``"argmax"`` (highest final PRM score; ties: highest weight, then lowest index).
    ``Result.log_weights``: the final sweep's ``selection_logits`` (``f32[N]``, for ``"puri"``
    minus ``log N``); ``log_evidence`` is ``None`` (conditional SMC gives no evidence estimate).

    Compute accounting in ``Result.extras``, summed over sweeps: ``generated_tokens`` (sampled
    tokens: ``N`` particles in the first sweep, ``N − 1`` in later ones), ``forced_tokens`` (the
    reference's teacher-forced tokens: LM forward passes without sampling, one reference length
    per conditional sweep), ``reward_calls`` (PRM calls, the pinned particle's included). Also
    ``references`` (the reference text drawn after each sweep), ``sweeps`` (each sweep's final
    solutions; ``sweeps[m][0]`` is the pinned particle for ``m ≥ 1``) and ``reference_index``.
    A budget of ``num_particles · num_iterations`` trajectories."""

    num_particles: int = 8
    num_iterations: int = 4
    tau: float = 1.0
    weights: str = "fk"
    answer: str = "vote"
    answer_parser: Callable[[str], Any] = parse_answer

    name = "ParticleGibbs"

    def __post_init__(self):
        checks.check_num_particles(self.num_particles)
        checks.check_int("num_iterations", self.num_iterations, 1)
        if self.num_iterations > 1 and self.num_particles < 2:
            raise ConfigError("particle Gibbs with more than one iteration needs num_particles >= 2")
        check_weights(self.weights)
        _check_answer_rule(self.answer)
        _check_tau(self.tau)

    def run(self, key: jax.Array, program: Any, args: tuple) -> Result:
        spec = _spec_of(program, args)
        prog = pinned_program(spec, self.tau)
        t0 = time.perf_counter()
        check_reward(spec.prm, "process reward")
        n, weights = self.num_particles, self.weights
        dyn, static_key, rebuild = split_args(args)

        def sweep(key, has_ref, ref, dyn):
            return conditional_sweep(key, prog, rebuild(dyn), n, ref, has_ref, weights)

        fn, _ = cached_jit(("reasoning-pg", prog, n, weights, static_key), lambda: sweep)
        reference = jnp.zeros((spec.max_new_tokens,), jnp.int32)
        reference_length = generated = forced = calls = 0
        references, sweeps = [], []
        for m in range(self.num_iterations):
            out, index = fn(jax.random.fold_in(key, m), jnp.asarray(m > 0), reference, dyn)
            run = _Run({**out, "state": out["state"].reasoning}, t0, args, spec, True)
            _, tokens, reward_calls = _accounting(run)
            forced += reference_length  # 0 before the first reference
            generated += tokens - reference_length
            calls += reward_calls
            _, solutions = _texts(run)
            index = int(index)
            ctx = run.out["state"].ctx
            reference, reference_length = ctx.tokens[index], int(ctx.length[index])
            sweeps.append(solutions)
            references.append(solutions[index])
        state = run.out["state"]
        logits = run.out["log_weights"] if weights == "fk" else state.potential  # selection_logits
        log_weights = logits if weights == "fk" else logits - jnp.log(n)
        if self.answer == "vote":
            rule, values = "vote", logits
        else:
            order = np.lexsort((-np.arange(n), np.asarray(logits), np.asarray(state.score)))
            rule, values = "argmax", (np.arange(n) == order[-1]).astype(np.float64)
        result = _finish(self, run, log_weights, None, rule, values)
        result.extras.update(
            generated_tokens=generated,
            forced_tokens=forced,
            reward_calls=calls,
            references=references,
            sweeps=sweeps,
            reference_index=index,
        )
        return result


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


class _Run(NamedTuple):
    out: dict  # run_loop's output (or a sweep's): ReasoningState particles, and records of account
    t0: float
    args: tuple
    spec: StepSpec
    scored: bool  # the program called the PRM for every particle that ran a step


def _run(key: jax.Array, program: ReasoningProgram, args: tuple, loop: Loop) -> _Run:
    """``run_loop``'s output through the run wrapper of every SMC-family algorithm
    (:func:`~ppinfer.algorithms.smc.run_chunked`: compiled once per program, loop and static
    arguments, in chunks with a progress bar and Ctrl-C between them; no eager dry run, which
    would call the reward outside the accounting)."""
    t0 = time.perf_counter()
    scored = program.weighting != "plain"
    if scored:
        check_reward(program.spec.prm, "process reward")
    dyn, static_key, rebuild = split_args(args)
    cache_key = ("reasoning", program, loop, static_key)
    out = run_chunked(cache_key, key, dyn, rebuild, program, args, loop, None, "Reasoning", dry_run=False)
    return _Run(out, t0, args, program.spec, scored)


def _accounting(run: _Run) -> tuple[int, int, int]:
    """``(steps run, generated tokens, PRM calls)`` from the records of :func:`account`."""
    tokens, running = (np.asarray(run.out["records"][k]) for k in ("tokens", "running"))
    return int(np.sum(running > 0)), int(tokens.sum()), int(running.sum()) if run.scored else 0


def _spec_of(program: Any, args: tuple) -> StepSpec:
    if not isinstance(program, ReasoningProgram) or program.spec is None:
        raise ConfigError(
            "reasoning algorithms run a step-level program: pass reasoning_program(StepSpec(...))"
        )
    if len(args) != 1 or not isinstance(args[0], ReasoningArgs):
        raise ConfigError("a reasoning program takes one argument: question_args(lm, spec, question)")
    return program.spec


def _check_answer_rule(rule: str) -> None:
    if rule not in ANSWER_RULES:
        raise ConfigError(f"unknown answer rule {rule!r}; choose one of {ANSWER_RULES}")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ConfigError(f"tau must be > 0, got {tau}")


def _check_callable(name: str, fn: Any) -> None:
    if not callable(fn):
        raise ConfigError(f"{name} must be a callable (question, solution) -> float, got {fn!r}")


def _sampled(alg: Any, key: jax.Array, program: Any, args: tuple, reward: Reward | None, rule: str):
    prog = reasoning_program(_spec_of(program, args), "plain")
    run = _run(key, prog, args, reasoning_loop(prog, args, alg.num_particles, INDEPENDENT))
    lw = run.out["log_weights"]
    if reward is None:
        return _finish(alg, run, lw, 0.0, rule, jnp.zeros_like(lw))
    question, solutions = _texts(run)
    scores = np.asarray([score(reward, f"{alg.name} reward", question, s) for s in solutions], np.float32)
    with np.errstate(divide="ignore"):
        votes = np.log(scores) if rule == "vote" else scores
    return _finish(alg, run, lw, 0.0, rule, votes, len(solutions))


def _texts(run: _Run) -> tuple[str, list[str]]:
    spec, a = run.spec, run.args[0]
    q, qlen = jax.device_get((a.question, a.question_length))
    ctx = run.out["state"].ctx
    toks, lens = jax.device_get((ctx.tokens, ctx.length))
    solutions = [
        spec.decode([int(t) for t in row[:n] if t != spec.eos_id]) for row, n in zip(toks, lens, strict=True)
    ]
    return spec.decode([int(t) for t in q[: int(qlen)]]), solutions


def _finish(alg, run: _Run, log_weights, log_z, rule, values, extra_calls: int = 0) -> Result:
    """Decode, pick the answer by ``rule`` from ``values: f[N]`` (log vote weights for "vote",
    scores for "argmax"), and build the Result with the compute accounting."""
    question, solutions = _texts(run)
    answers = [_parsed(alg.answer_parser, s) for s in solutions]
    values = np.asarray(values, np.float64)
    if rule == "vote":
        answer, tally = weighted_vote(answers, values)
    elif rule == "argmax":
        answer, tally = answers[int(np.argmax(values))], {}
    else:
        answer, tally = answers[0], {}
    num_steps, tokens, calls = _accounting(run)
    state = run.out["state"]
    return Result(
        samples={"tokens": state.ctx.tokens, "length": state.ctx.length, "score": state.score},
        log_weights=log_weights,
        log_evidence=log_z,
        algorithm=alg.name,
        ess=run.out["ess"],
        resampled=run.out["resampled"],
        state=state,
        wall_time=time.perf_counter() - run.t0,
        extras={
            "answer": answer,
            "answers": answers,
            "solutions": solutions,
            "question": question,
            "votes": tally,
            "num_steps": num_steps,
            "generated_tokens": tokens,
            "reward_calls": calls + int(extra_calls),
        },
    )


def _parsed(parser: Callable[[str], Any], solution: str) -> Any:
    """``parser(solution)``; an exception in it is a :class:`ModelError` naming the solution (as a
    reward's is)."""
    name = getattr(parser, "__name__", parser)
    try:
        answer = parser(solution)
    except Exception as e:
        raise ModelError(
            f"answer_parser {name!r} raised {type(e).__name__}: {e} on the solution {solution[:200]!r}"
        ) from e
    try:
        hash(answer)
    except TypeError:
        raise ModelError(
            f"answer_parser {name!r} returned {answer!r} on the solution {solution[:200]!r}: an answer "
            "must be hashable (answers are tallied in a vote), e.g. a number, a string or a tuple"
        ) from None
    return answer


def weighted_vote(answers: Sequence[Any], log_votes: Any) -> tuple[Any, dict]:
    """The answer with the largest total vote ``Σ exp(log_votes[i])`` over the samples giving it
    (``None`` answers do not vote; ties: the answer seen first). Returns ``(answer, tally)``, the
    tally holding each answer's share of the normalised votes of all samples (the samples without
    an answer hold the rest).

    Raises :class:`~ppinfer.errors.DataError` for answers and votes of different lengths, or a NaN
    or ``+inf`` log vote; :class:`~ppinfer.errors.ZeroEvidenceError` when every vote is zero
    (``−inf``)."""
    lv = np.asarray(log_votes, np.float64).reshape(-1)
    if len(answers) != lv.size:
        raise DataError(f"weighted_vote: {len(answers)} answers but {lv.size} log votes")
    if np.any(np.isnan(lv) | (lv == np.inf)):
        raise DataError(f"weighted_vote: a log vote is NaN or +inf: {lv.tolist()}")
    if lv.size and np.all(lv == -np.inf):
        raise ZeroEvidenceError("weighted_vote: every vote is zero (every log vote is -inf): no answer wins")
    finite = lv[np.isfinite(lv)]
    shift = finite.max() if finite.size else 0.0
    votes = np.exp(lv - shift)
    votes = votes / votes.sum() if votes.sum() > 0 else votes
    tally: dict = {}
    for a, v in zip(answers, votes, strict=True):
        if a is not None:
            tally[a] = tally.get(a, 0.0) + float(v)
    if not tally:
        return None, tally
    return max(tally, key=tally.get), tally
