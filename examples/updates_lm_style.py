"""Sequential Bayesian updates over a stream of texts, with likelihoods from the embedded LM.

Three hidden "styles" are three prefixes given to the embedded small GPT-2; a text's likelihood
under style k is ``log p(text | prefix_k)`` by teacher forcing (``tokens.score_tokens``). Texts
arrive one at a time and after each one we show

1. the posterior over *which single style* wrote the stream (a discrete latent: the update is
   exact — the posterior, enumerated with :class:`~ppinfer.Enumerate`, becomes the next prior — and
   it matches batch enumeration over all texts so far);
2. the IBIS posterior (:class:`~ppinfer.updates.IBIS`) over the *mixture proportions* ``w`` of the
   styles, when each text picks its own style ``z_j ~ Categorical(w)`` (``w ~ Dirichlet(1, 1, 1)``),
   against the exact posterior mean of ``w`` by enumerating every assignment ``z_{1:t}``.

Runs in seconds on CPU: ``python examples/updates_lm_style.py [plot.png]`` (with a file name, also
plots both posteriors against the number of texts).
"""

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from scipy.special import gammaln, logsumexp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppinfer as pp  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402
from ppinfer.updates import IBIS  # noqa: E402

STYLES = {"arithmetic": "<|endoftext|>Q:", "code": "<|endoftext|>def", "imports": "<|endoftext|>import"}
STREAM = [" 3+4 = ? Step: 3+4=7 A: 7", " os", " 12*2 = ? Step:", " 8-5 = ? A: 3", " sys", " 9+1 = ?"]
MAX_TOKENS = 16


def text_log_likelihoods(lm, texts: list[str]) -> np.ndarray:
    """``f[K, J]``: ``log p(text_j | prefix_k)`` by teacher forcing (texts padded to MAX_TOKENS and
    masked, so one compiled scorer serves every text)."""

    @jax.jit
    def score(p, toks, mask):
        def body(ctx, tm):
            tok, m = tm
            return ctx.extend(p, tok), jnp.where(m, ctx.logp[tok], 0.0)

        _, lps = jax.lax.scan(body, tk.Context.start(p), (toks, mask))
        return jnp.sum(lps)

    out = np.zeros((len(STYLES), len(texts)))
    for k, prefix in enumerate(STYLES.values()):
        p = tk.prompt(lm, prefix, MAX_TOKENS)
        for j, text in enumerate(texts):
            ids = list(lm.tokenizer.encode(text))[:MAX_TOKENS]
            toks = np.zeros(MAX_TOKENS, np.int32)
            toks[: len(ids)] = ids
            out[k, j] = float(score(p, jnp.asarray(toks), jnp.arange(MAX_TOKENS) < len(ids)))
    return out


def which_style(prior_logits, log_liks):
    """One style wrote every text: ``style ~ Categorical(prior)``, each text adds ``log_liks[style]``
    (``log_liks: f[J, K]``, the texts of this update)."""
    style = pp.sample("style", dist.Categorical(logits=prior_logits))
    pp.factor("texts", jnp.sum(log_liks[:, style]))


def mixture(log_lik):
    """Each text picks its style: ``log p(text | w) = log Σ_k w_k p(text | k)`` (``log_lik: f[K]``,
    one text per batch; the likelihood factorises over texts, as IBIS needs)."""
    w = pp.sample("w", dist.Dirichlet(jnp.ones(len(STYLES))))
    pp.factor("text", jax.scipy.special.logsumexp(jnp.log(w) + log_lik))


def exact_mixture_mean(log_liks: np.ndarray) -> np.ndarray:
    """``E[w | texts]`` by enumerating every assignment ``z ∈ {1..K}^J`` (Dirichlet(1)-multinomial)."""
    k, j = log_liks.shape
    log_post, means = [], []
    for z in itertools.product(range(k), repeat=j):
        counts = np.bincount(z, minlength=k)
        log_dm = gammaln(k) - gammaln(k + j) + np.sum(gammaln(1 + counts))  # p(z) under Dir(1)
        log_post.append(log_dm + sum(log_liks[zi, i] for i, zi in enumerate(z)))
        means.append((1 + counts) / (k + j))
    w = np.exp(np.asarray(log_post) - logsumexp(log_post))
    return w @ np.asarray(means)


def main(num_particles: int = 1000, plot: str | None = None) -> dict:
    """Prints the likelihoods and both posteriors after each text; returns ``log_liks`` (``f[K, J]``),
    the per-text ``history`` (``style``/``style_exact``: P(style | texts) sequential and batch;
    ``w``/``w_exact``: IBIS and exact E[w | texts]), ``log_z`` (one style, sequential) and
    ``log_z_batch`` (by enumeration over all texts), and IBIS's ``ibis_log_z`` and ``ibis_ess``."""
    lm = load_default()
    log_liks = text_log_likelihoods(lm, STREAM)  # [K, J]
    names = list(STYLES)
    print("log p(text | style):")
    for j, text in enumerate(STREAM):
        print(f"  {text!r:32} " + "  ".join(f"{n}={log_liks[k, j]:7.2f}" for k, n in enumerate(names)))

    prior = jnp.zeros(len(STYLES))  # uniform, as logits
    logits, log_z = prior, 0.0
    mixture_post = None
    history = {"style": [], "style_exact": [], "w": [], "w_exact": []}
    print("\nafter each text: P(style | texts) sequential [batch]   |   IBIS E[w] [exact]")
    for t in range(len(STREAM)):
        batch = jnp.asarray(log_liks[:, t : t + 1].T)
        step = pp.infer(which_style, logits, batch, algorithm=pp.Enumerate())
        logits = _posterior_logits(step, len(STYLES))  # the posterior becomes the prior
        log_z += step.log_evidence
        whole = pp.infer(which_style, prior, jnp.asarray(log_liks[:, : t + 1].T), algorithm=pp.Enumerate())
        exact = np.exp(np.asarray(_posterior_logits(whole, len(STYLES))))
        seq = np.exp(np.asarray(logits))
        assert np.allclose(seq, exact, atol=1e-5) and abs(log_z - whole.log_evidence) < 1e-3

        text_ll = jnp.asarray(log_liks[:, t], jnp.float32)
        if mixture_post is None:
            mixture_post = pp.infer(mixture, text_ll, algorithm=IBIS(num_particles), key=0)
        else:
            mixture_post = mixture_post.update(text_ll)
        w_ibis = np.asarray(mixture_post.mean("w"))
        w_exact = exact_mixture_mean(log_liks[:, : t + 1])
        for name, value in zip(history, (seq, exact, w_ibis, w_exact), strict=True):
            history[name].append(value)
        fmt = lambda v: " ".join(f"{x:.3f}" for x in v)
        print(f"  t={t + 1}: {fmt(seq)} [{fmt(exact)}]   |   {fmt(w_ibis)} [{fmt(w_exact)}]")
    print(f"\nlog p(stream | one style) = {log_z:.3f} (sum of the per-text increments)")
    ess = mixture_post.final_ess
    print(f"IBIS mixture model: log Ẑ = {mixture_post.log_evidence:.3f}, final ESS {ess:.0f}")
    if plot:
        _plot(history, names, plot)
    return {
        "log_liks": log_liks,
        "history": {k: np.asarray(v) for k, v in history.items()},
        "log_z": float(log_z),
        "log_z_batch": float(whole.log_evidence),
        "ibis_log_z": float(mixture_post.log_evidence),
        "ibis_ess": float(ess),
    }


def _plot(history: dict, names: list[str], path: str) -> None:
    """Both posteriors against the number of texts seen (lines: sequential; markers: exact)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharex=True)
    t = np.arange(1, len(history["style"]) + 1)
    titles = ("P(style wrote every text | texts)", "E[w | texts]: IBIS (lines), exact (x)")
    pairs = (("style", "style_exact"), ("w", "w_exact"))
    for ax, (seq, exact), title in zip(axes, pairs, titles, strict=True):
        for k, name in enumerate(names):
            line = ax.plot(t, np.asarray(history[seq])[:, k], label=name)[0]
            ax.plot(t, np.asarray(history[exact])[:, k], "x", color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("texts seen")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def _posterior_logits(result, num_styles: int) -> jax.Array:
    """Normalised log posterior probabilities of ``style`` from an Enumerate result."""
    styles = np.asarray(result.samples["style"])
    lw = np.asarray(result.log_weights) - logsumexp(np.asarray(result.log_weights))
    out = np.full(num_styles, -np.inf)
    for s, w in zip(styles, lw, strict=True):
        out[s] = np.logaddexp(out[s], w)
    return jnp.asarray(out, jnp.float32)


if __name__ == "__main__":
    main(plot=sys.argv[1] if len(sys.argv) > 1 else None)
