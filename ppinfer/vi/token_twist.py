"""A learned token-level twist for a constrained language-model program, and its induced proposal.

Target. The LM ``p`` continues a prompt; a token automaton (:mod:`ppinfer.constraints`) must accept
the text and the sequence must end with EOS within ``T = max_new_tokens`` tokens::

    π(x) ∝ p(x) · 1[every token allowed by the automaton] · 1[x ends with EOS, |x| ≤ T]

so ``Z = P_p(the constraint holds)``. The locally constrained proposal (the LM masked by the
automaton) sees the automaton but not the budget: particles that cannot finish in time die only at
the end, and ``log Ẑ`` is very noisy.

Twist. ``ψ_θ(x_{1:t+1})`` estimates the log-probability that the LM completes the prefix into an
accepted sequence in time. It is a small network (:class:`TwistParams`) of

- the automaton state after the prefix (the *constraint state*),
- the number of tokens generated,
- the LM's final hidden state *before* the last token (recovered exactly from the context's
  next-token log-probabilities by a fixed linear readout: :func:`hidden_state_features`),
- the last token's embedding,

so that the values of all ``V`` one-token extensions of a prefix, ``ψ_θ(x_{1:t} v)`` for every
``v``, cost one small matrix product (:func:`next_values`), not ``V`` LM calls. The output is
``log σ(ℓ) ≤ 0``. Two pieces are exact rather than learned: an accepted EOS has value 0 (the
constraint holds), and at the last step a non-EOS token has value ``−∞`` (the budget is spent).

Use in SMC (:func:`twisted_program`, :func:`twisted_proposal`). The step applies the twist with
:func:`ppinfer.tokens.twist`, which adds ``ψ_{t+1} − ψ_t`` and removes the last one at the end, so the
twists telescope: the final target and ``Z`` are those of the untwisted program whatever ``θ`` is, and
SMC with the twist still gives ``E[Ẑ] = Z``. The twist-induced proposal is
``q(v | x_{1:t}) ∝ p(v | x_{1:t}) · 1[v allowed] · exp ψ_θ(x_{1:t} v)``; its ``log p/q`` weight is added
by the engine, so the incremental log weight of a step is ``log Z_t − ψ_t`` with
``Z_t = Σ_v p(v) 1[v allowed] e^{ψ_θ(x_{1:t} v)}`` — the same for every token the proposal picks.

Training objective (:func:`fit_token_twist`, :func:`bellman_loss`). The optimal twist
``ψ*_t(x_{1:t}) = log P_p(constraint | x_{1:t})`` is the unique solution of the soft Bellman equation
``ψ*_t(x_{1:t}) = log Σ_v p(v | x_{1:t}) 1[v allowed] e^{ψ*_{t+1}(x_{1:t} v)}`` with the exact terminal
values above. The loss is its mean squared residual ``(ψ_θ,t − sg[log Z_t])²`` over prefixes of
rollouts of the current twisted proposal (fitted value iteration / soft Q-learning, semi-gradient:
the target is not differentiated). For the twist-induced proposal that residual *is* the incremental
log weight, so the loss is the mean squared incremental log weight of the twisted sampler: driving
it to zero makes all weights equal (ESS = N, ``Var log Ẑ = 0``). The loss needs no sample that
satisfies the constraint (the exact one-step sums propagate the terminal values backwards) and is
scale-free in ``Z`` (it works in log space), unlike a classifier on rare successes.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from ppinfer import checks
from ppinfer import tokens as tk
from ppinfer._compile import locked
from ppinfer.constraints import TokenAutomaton
from ppinfer.errors import ConfigError, InferenceError, ModelError
from ppinfer.primitives import condition, sample, stop
from ppinfer.program import SequentialProgram, sequential

__all__ = [
    "TwistParams",
    "TwistFeatures",
    "TokenTwist",
    "Rollouts",
    "FitInfo",
    "init_token_twist",
    "hidden_state_features",
    "log_prob_features",
    "next_values",
    "twisted_program",
    "twisted_proposal",
    "masked_proposal",
    "rollouts",
    "bellman_loss",
    "fit_token_twist",
]

# Finite stand-in for log 0 (as in ppinfer.tokens): exp gives exactly 0, and 0 · it stays finite.
_IMPOSSIBLE = -1e30
# Features are log-probabilities clipped here, so that an exact zero (an n-gram's −inf) stays finite.
_LOGP_FLOOR = -30.0


class TwistParams(NamedTuple):
    """The twist network's parameters (``H`` hidden units).

    ``ℓ = out · tanh(state[s'] + time[t] + h @ context + e_v @ token + bias) + out_bias`` and
    ``ψ = log σ(ℓ)``, for the automaton state ``s'`` after token ``v``, step ``t``, LM features
    ``h: f32[F]`` of the context ``v`` was drawn from and the token's features ``e_v: f32[E]``.

    Attributes:
        state: ``f32[S, H]``; time: ``f32[T, H]``; context: ``f32[F, H]``; token: ``f32[E, H]``;
        bias: ``f32[H]``; out: ``f32[H]``; out_bias: ``f32[]``.
    """

    state: jax.Array
    time: jax.Array
    context: jax.Array
    token: jax.Array
    bias: jax.Array
    out: jax.Array
    out_bias: jax.Array


class TwistFeatures(NamedTuple):
    """Fixed (not learned) inputs of the twist network, derived from the LM.

    Attributes:
        readout: ``f32[V, F]``: the context features are ``max(logp, −30) @ readout`` for the
            context's next-token log-probabilities ``logp: f32[V]``.
        token: ``f32[V, E]``: row ``v`` is token ``v``'s features.
    """

    readout: jax.Array
    token: jax.Array


class TokenTwist(NamedTuple):
    """A twist head: its parameters, the LM-derived features it reads, and a ``strength: f32[]``
    ``λ`` scaling every twist value (1: the learned twist; 0: no twist, and the twisted proposal is
    the locally constrained one — the baseline, with the same compiled program). ``λψ`` is a valid
    twist for every ``λ``. A pytree: pass it to the program as an argument, so that new parameters
    or strengths do not recompile it."""

    params: TwistParams
    features: TwistFeatures
    strength: jax.Array

    def off(self) -> TokenTwist:
        """The same head with strength 0 (the untwisted, locally constrained sampler)."""
        return self._replace(strength=jnp.zeros((), jnp.float32))


def hidden_state_features(lm) -> TwistFeatures:
    """Features of a :class:`~ppinfer.lm.LanguageModel`: the final (normalised) hidden state ``h:
    f32[D]``, read exactly from the next-token log-probabilities, and the token embeddings.

    ``logp = h @ W − logsumexp`` with the output matrix ``W: f32[D, V]``, so ``[h, −lse] =
    logp @ pinv([Wᵀ, 1])ᵀ``: a fixed linear map (``V > D``), computed once here. Token programs
    carry ``logp`` in their :class:`~ppinfer.tokens.Context`, not the hidden state, and this gives
    the head the hidden state without changing the LM's step."""
    params, config = lm.params, lm.config
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"].T  # [V, D]
    head = np.asarray(head, np.float64)
    design = np.concatenate([head, np.ones((head.shape[0], 1))], axis=1)  # [V, D + 1]
    readout = np.linalg.pinv(design).T[:, : head.shape[1]]  # [V, D]
    return TwistFeatures(jnp.asarray(readout, jnp.float32), jnp.asarray(head, jnp.float32))


def log_prob_features(vocab_size: int) -> TwistFeatures:
    """Features for a small-vocabulary LM (e.g. :class:`~ppinfer.lm.NGramLM`): the context's
    next-token log-probabilities themselves (scaled by 1/10) and one-hot tokens."""
    if int(vocab_size) < 1:
        raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
    eye = jnp.eye(int(vocab_size), dtype=jnp.float32)
    return TwistFeatures(eye / 10.0, eye)


def init_token_twist(
    key: jax.Array | int,
    automaton: TokenAutomaton,
    features: TwistFeatures,
    max_new_tokens: int,
    hidden: int = 32,
    scale: float = 0.1,
) -> TokenTwist:
    """A twist head with random parameters (``N(0, scale²)`` entries; ``out_bias = 2``, so that the
    initial twist is nearly flat, ``ψ ≈ log σ(2) ≈ −0.13``, and its proposal nearly the masked LM).

    Raises :class:`ConfigError` for a non-positive ``hidden``/``max_new_tokens`` or features whose
    vocabulary differs from the automaton's."""
    if int(hidden) < 1 or int(max_new_tokens) < 1:
        raise ConfigError(f"hidden and max_new_tokens must be >= 1, got {hidden} and {max_new_tokens}")
    num_states, vocab = automaton.next_state.shape
    if features.readout.shape[0] != vocab or features.token.shape[0] != vocab:
        raise ConfigError(
            f"the twist features cover {features.readout.shape[0]}/{features.token.shape[0]} tokens but "
            f"the automaton's vocabulary has {vocab}"
        )
    key = checks.as_key(key)
    ks = jax.random.split(key, 5)
    h = int(hidden)

    def normal(k, shape):
        return scale * jax.random.normal(k, shape, jnp.float32)

    params = TwistParams(
        state=normal(ks[0], (num_states, h)),
        time=normal(ks[1], (int(max_new_tokens), h)),
        context=normal(ks[2], (features.readout.shape[1], h)),
        token=normal(ks[3], (features.token.shape[1], h)),
        bias=jnp.zeros((h,), jnp.float32),
        out=normal(ks[4], (h,)),
        out_bias=jnp.asarray(2.0, jnp.float32),
    )
    return TokenTwist(params, features, jnp.ones((), jnp.float32))


def next_values(
    twist: TokenTwist,
    automaton: TokenAutomaton,
    logp: jax.Array,
    state: jax.Array,
    t: jax.Array,
    num_steps: int,
) -> jax.Array:
    """``f32[V]``: ``λ ψ_θ(x_{1:t} v)`` (``λ = twist.strength``) for every next token ``v`` of a
    prefix whose context has next-token log-probabilities ``logp: f32[V]`` and automaton state
    ``state: i32[]``, at step ``t: i32[]`` (``t`` tokens generated so far, ``0 ≤ t < num_steps``).

    Allowed non-EOS tokens get the network's ``log σ(ℓ) ≤ 0`` — except at the last step
    (``t = num_steps − 1``), where they get ``−1e30`` (the budget is spent); an allowed EOS gets 0;
    a disallowed token gets ``−1e30`` (log 0)."""
    p = twist.params
    allowed = automaton.allowed(state)
    is_eos = jnp.arange(allowed.shape[-1]) == automaton.eos_id
    nxt = jnp.maximum(automaton.next_state[state], 0)  # [V]
    hidden = jnp.tanh(
        p.state[nxt]
        + p.time[jnp.minimum(t, p.time.shape[0] - 1)]
        + _context_features(twist, logp) @ p.context
        + _token_table(twist)
        + p.bias
    )  # [V, H]
    psi = jax.nn.log_sigmoid(hidden @ p.out + p.out_bias)
    last = t >= num_steps - 1
    psi = jnp.where(is_eos, 0.0, jnp.where(last, _IMPOSSIBLE, psi))
    return jnp.where(allowed, twist.strength * psi, _IMPOSSIBLE)


def twisted_program(max_new_tokens: int) -> SequentialProgram:
    """The constrained token program on arguments ``(p, automaton, twist)``: ``p`` an
    :class:`~ppinfer.tokens.LMPrompt` with ``p.max_new_tokens == max_new_tokens``, the automaton,
    and a :class:`TokenTwist`. The state is ``(context, automaton state i32[], ψ f32[])``.

    Each step samples ``"tok"`` from the LM, conditions on the automaton allowing it and (at the
    last step) on EOS, stops at EOS, and applies the twist ``λ ψ_θ(x_{1:t+1})`` with
    :func:`ppinfer.tokens.twist` (``ψ_{t+1} − ψ_t``; removed at the end).
    Validity: the twists telescope, so for every ``twist`` (any parameters, any strength) the target
    and ``Z`` equal those of the untwisted program (strength 0), and SMC on it gives ``E[Ẑ] = Z``
    with any proposal whose support covers the allowed tokens (:func:`twisted_proposal`,
    :func:`masked_proposal`)."""
    t_max = int(max_new_tokens)
    if t_max < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def init(p, automaton, twist):
        _check_args(p, automaton, twist, t_max)
        return tk.Context.start(p), automaton.initial, jnp.zeros((), jnp.float32)

    def step(state, t, p, automaton, twist):
        ctx, s, psi = state
        tok = sample("tok", ctx.next_token())
        condition("allowed", automaton.allowed(s)[tok])
        done = tok == automaton.eos_id
        tk.require_eos("finished", done, t, t_max)
        stop(done)
        value = next_values(twist, automaton, ctx.logp, s, t, t_max)[tok]
        psi = tk.twist("twist", value, psi, final=done | (t >= t_max - 1))
        return ctx.extend(p, tok), automaton.advance(s, tok), psi

    return sequential(init, step, t_max)


def twisted_proposal(state, t, p, automaton, twist) -> None:
    """The twist-induced proposal for :func:`twisted_program`: ``"tok"`` from
    ``q(v) ∝ p(v) · 1[v allowed] · exp λψ_θ(x_{1:t} v)`` (the masked LM if no allowed token has a
    finite value, e.g. at the last step outside an accepting state: the particle dies there anyway).
    Its support is every allowed token with a finite value, which covers the target's."""
    ctx, s, _ = state
    num_steps = p.max_new_tokens
    values = next_values(twist, automaton, ctx.logp, s, t, num_steps)
    sample("tok", _twisted_categorical(ctx.logp, automaton.allowed(s), values))


def masked_proposal(state, t, p, automaton, twist) -> None:
    """The locally constrained proposal (the LM masked by the automaton; ignores the twist): the
    baseline. Its ``p/q`` weight is the allowed mass ``Σ_{v allowed} p(v)``."""
    ctx, s, _ = state
    sample("tok", tk.masked_next_token(ctx, automaton.allowed(s)))


class Rollouts(NamedTuple):
    """Training data: ``M`` independent rollouts of the twisted proposal (no resampling).

    Row ``t`` of each particle describes step ``t``: ``features: f32[M, T, F]`` of the context the
    token was drawn from, ``states: i32[M, T]`` automaton states *after* the token, ``tokens:
    i32[M, T]``, ``targets: f32[M, T]`` = ``log Z_t`` (the soft Bellman backup of the prefix
    ``x_{1:t}``, computed with the parameters the rollout used), ``active: bool[M, T]`` the particle
    was running at step ``t``."""

    features: jax.Array
    states: jax.Array
    tokens: jax.Array
    targets: jax.Array
    active: jax.Array


def rollouts(
    key: jax.Array, p: tk.LMPrompt, automaton: TokenAutomaton, twist: TokenTwist, num: int
) -> Rollouts:
    """``num`` independent runs of :func:`twisted_proposal` for ``p.max_new_tokens`` steps, with the
    data :func:`bellman_loss` needs (jit-able; one batched LM step per token)."""
    t_max = p.max_new_tokens
    ctx0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (num, *x.shape)), tk.Context.start(p))
    s0 = jnp.full((num,), automaton.initial, jnp.int32)

    def one(ctx, s, done, t, k):
        values = next_values(twist, automaton, ctx.logp, s, t, t_max)
        allowed = automaton.allowed(s)
        log_z = jax.scipy.special.logsumexp(jnp.where(allowed, ctx.logp + values, -jnp.inf))
        tok = _twisted_categorical(ctx.logp, allowed, values).sample(k)
        nxt = automaton.advance(s, tok)
        feats = _context_features(twist, ctx.logp)
        return tok, nxt, log_z, feats, ~done

    def body(carry, inputs):
        ctx, s, done = carry
        t, k = inputs
        tok, nxt, log_z, feats, active = jax.vmap(one, in_axes=(0, 0, 0, None, 0))(
            ctx, s, done, t, jax.random.split(k, num)
        )
        new_ctx = jax.vmap(lambda c, v: c.extend(p, v))(ctx, tok)
        keep = lambda new, old: jnp.where(done.reshape(done.shape + (1,) * (new.ndim - 1)), old, new)
        ctx = jax.tree.map(keep, new_ctx, ctx)
        s = jnp.where(done, s, nxt)
        done = done | (tok == automaton.eos_id) | (nxt < 0)
        return (ctx, s, done), (feats, s, tok, log_z, active)

    steps = (jnp.arange(t_max, dtype=jnp.int32), jax.random.split(key, t_max))
    _, (feats, states, toks, targets, active) = jax.lax.scan(body, (ctx0, s0, jnp.zeros((num,), bool)), steps)
    swap = lambda x: jnp.swapaxes(x, 0, 1)
    return Rollouts(swap(feats), swap(states), swap(toks), swap(targets), swap(active))


def bellman_loss(params: TwistParams, twist: TokenTwist, data: Rollouts, floor: float = -20.0) -> jax.Array:
    """``f32[]``: mean over rollout prefixes ``x_{1:t}`` (``1 ≤ t < T``, particle still running) of
    ``(ψ_θ(x_{1:t}) − max(log Z_t, floor))²``, the squared soft-Bellman residual; ``data.targets``
    are constants (semi-gradient). With the twist-induced proposal the residual is the incremental
    log weight of step ``t``. ``floor`` bounds the target of doomed prefixes (``log Z_t = −∞``)."""
    head = twist._replace(params=params)
    p = head.params
    # ψ_θ(x_{1:t}) was set at step t−1 from that step's context features and the token drawn there.
    feats, states, toks = data.features[:, :-1], data.states[:, :-1], data.tokens[:, :-1]
    t = jnp.arange(feats.shape[1])
    hidden = jnp.tanh(
        p.state[jnp.maximum(states, 0)]
        + p.time[jnp.minimum(t, p.time.shape[0] - 1)][None]
        + feats @ p.context
        + _token_table(head)[toks]
        + p.bias
    )
    psi = head.strength * jax.nn.log_sigmoid(hidden @ p.out + p.out_bias)
    target = jnp.maximum(data.targets[:, 1:], floor)
    mask = data.active[:, 1:] & (states >= 0)
    sq = jnp.where(mask, jnp.square(psi - target), 0.0)
    return jnp.sum(sq) / jnp.maximum(jnp.sum(mask), 1)


class FitInfo(NamedTuple):
    """What :func:`fit_token_twist` did: ``loss_trace: f[I]`` the Bellman loss of each iteration's
    fresh rollouts *before* that iteration's updates (an out-of-sample estimate), and the wall time
    ``seconds`` (compilation included)."""

    loss_trace: np.ndarray
    seconds: float


@locked  # traces programs under NumPyro's global handler stack: thread-safe, like infer
def fit_token_twist(
    key: jax.Array | int,
    p: tk.LMPrompt,
    automaton: TokenAutomaton,
    twist: TokenTwist,
    num_iterations: int = 30,
    num_rollouts: int = 64,
    updates_per_iteration: int = 20,
    optimizer: optax.GradientTransformation | None = None,
    floor: float = -20.0,
) -> tuple[TokenTwist, FitInfo]:
    """Fit the twist head by fitted soft value iteration: each iteration draws ``num_rollouts``
    rollouts of the current twisted proposal (:func:`rollouts`, targets from the current
    parameters) and takes ``updates_per_iteration`` optimiser steps on :func:`bellman_loss`.
    Returns the fitted :class:`TokenTwist` and a :class:`FitInfo`. Default optimiser: Adam 1e-2.

    Raises :class:`ConfigError` for non-positive sizes, :class:`InferenceError` if the loss or the
    parameters become non-finite."""
    for name, value in (("num_iterations", num_iterations), ("num_rollouts", num_rollouts),
                        ("updates_per_iteration", updates_per_iteration)):  # fmt: skip
        if isinstance(value, bool) or int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value!r}")
    _check_args(p, automaton, twist, p.max_new_tokens)
    t0 = time.perf_counter()
    key = checks.as_key(key)
    opt = optax.adam(1e-2) if optimizer is None else optimizer
    draw = jax.jit(rollouts, static_argnums=4)

    @jax.jit
    def update(params, opt_state, twist, data):
        def body(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(bellman_loss)(params, twist, data, floor)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            body, (params, opt_state), None, length=updates_per_iteration
        )
        return params, opt_state, losses[0]

    params, opt_state, trace = twist.params, opt.init(twist.params), []
    for i in range(int(num_iterations)):
        data = draw(
            jax.random.fold_in(key, i), p, automaton, twist._replace(params=params), int(num_rollouts)
        )
        params, opt_state, first = update(params, opt_state, twist, data)
        first = float(first)
        if not np.isfinite(first) or not all(bool(jnp.all(jnp.isfinite(x))) for x in params):
            raise InferenceError(f"the twist's Bellman loss became non-finite at iteration {i}: {first}")
        trace.append(first)
    return twist._replace(params=params), FitInfo(np.asarray(trace), time.perf_counter() - t0)


def _context_features(twist: TokenTwist, logp: jax.Array) -> jax.Array:
    return jnp.maximum(logp, _LOGP_FLOOR) @ twist.features.readout


def _token_table(twist: TokenTwist) -> jax.Array:
    # [V, H]; independent of the particle, so under the engine's vmap it is computed once per step.
    return twist.features.token @ twist.params.token


def _twisted_categorical(logp: jax.Array, allowed: jax.Array, values: jax.Array) -> dist.Categorical:
    live = allowed & (values > _IMPOSSIBLE / 2)
    twisted = jnp.where(live, jnp.maximum(logp, _IMPOSSIBLE) + values, _IMPOSSIBLE)
    masked = jnp.where(allowed, jnp.maximum(logp, _IMPOSSIBLE), _IMPOSSIBLE)
    fallback = jnp.where(jnp.any(allowed), masked, jnp.maximum(logp, _IMPOSSIBLE))
    return dist.Categorical(logits=jnp.where(jnp.any(live), twisted, fallback))


def _check_args(p, automaton: TokenAutomaton, twist: TokenTwist, max_new_tokens: int) -> None:
    """Shape checks on the host (shapes are static under tracing)."""
    if not isinstance(twist, TokenTwist):
        raise ConfigError(f"twist must be a TokenTwist (see init_token_twist), got {type(twist).__name__}")
    num_states, vocab = automaton.next_state.shape
    if p.vocab_size != vocab:
        raise ConfigError(f"the LM has {p.vocab_size} tokens but the automaton covers {vocab}")
    if p.max_new_tokens != max_new_tokens:
        raise ConfigError(f"the prompt allows {p.max_new_tokens} new tokens but the program {max_new_tokens}")
    if not isinstance(automaton.eos_id, jax.core.Tracer) and int(automaton.eos_id) < 0:
        raise ModelError("the constrained program needs an automaton built with the LM's eos_id")
    tw = twist.params
    expected = {
        "state": (num_states, tw.bias.shape[0]),
        "time": (max_new_tokens, tw.bias.shape[0]),
        "context": (twist.features.readout.shape[1], tw.bias.shape[0]),
        "token": (twist.features.token.shape[1], tw.bias.shape[0]),
    }
    for name, shape in expected.items():
        if tuple(getattr(tw, name).shape) != shape:
            raise ConfigError(
                f"twist parameter {name!r} has shape {tuple(getattr(tw, name).shape)}, expected {shape} "
                f"(automaton with {num_states} states, {max_new_tokens} steps)"
            )
    if twist.features.readout.shape[0] != vocab or twist.features.token.shape[0] != vocab:
        raise ConfigError("the twist features do not cover the automaton's vocabulary")
