"""The main job (``make demo``).

1. Constrained generation with the embedded language model: continue ``def`` so that the text
   matches a regular expression for a function header, ends with EOS, and compiles as Python
   (``tk.constrained(prompt, Regex(...) & Predicate(...))``). SMC with the locally constrained
   proposal vs plain sampling with rejection: acceptance, log Ẑ, ESS, wall time, the top posterior
   samples; a genealogy/ESS plot (``out/demo_lm.png``) and an HTML view of the run
   (``out/demo_lm.html``, :meth:`Result.to_html`).
2. Structured output: a JSON schema as an exact constraint on the same LM, in one call
   (``tk.constrained``): every weighted particle is a document valid under the schema.
3. Classic models with exact answers: SMC on a linear-Gaussian state-space model (vs the Kalman
   filter) and a 3-state hidden Markov model (vs the forward algorithm); ``out/demo.png`` plots the
   SMC filtering mean ``E[x_t | y_0:t]`` (every step, from one run) against the Kalman filter's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the model zoo lives in the repository's models/ folder
    sys.path.insert(0, str(REPO))

import re  # noqa: E402

import jax  # noqa: E402

import ppinfer as pp  # noqa: E402
from models.classic import discrete_hmm, lgssm, simulate_hmm, simulate_lgssm  # noqa: E402
from models.lm_programs import parses_as_def  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from semantics import hmm_forward, kalman_filter  # noqa: E402

LG = dict(a=0.9, q=0.5, c=1.0, r=1.0)
HMM = dict(
    init_probs=[0.5, 0.3, 0.2],
    transition=[[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.1, 0.1, 0.8]],
    means=[-2.0, 0.0, 2.0],
    scale=1.0,
)


def run_lgssm(num_particles: int = 2000, num_steps: int = 100, out=print):
    ys = simulate_lgssm(0, num_steps, **LG)
    log_z, means, variances = kalman_filter(LG["a"], LG["q"], LG["c"], LG["r"], 0.0, 1.0, ys)
    t0 = time.perf_counter()
    result = pp.infer(lgssm(**LG), ys, algorithm=pp.SMC(num_particles), key=0)
    elapsed = time.perf_counter() - t0
    out(f"== Linear-Gaussian SSM: T={num_steps}, N={num_particles} (bootstrap SMC) ==")
    out(
        f"log Z: SMC {result.log_evidence:.3f}   exact (Kalman) {log_z:.3f}   "
        f"error {result.log_evidence - log_z:+.3f}"
    )
    last = float(result.mean("x")[-1]), float(result.std("x")[-1])
    out(
        f"x_T posterior: SMC mean {last[0]:.3f} sd {last[1]:.3f}   "
        f"exact mean {means[-1]:.3f} sd {np.sqrt(variances[-1]):.3f}"
    )
    gap = np.abs(np.asarray(result.filtering_mean("x")) - np.asarray(means))
    out(f"filtering mean E[x_t | y_0:t], SMC vs Kalman: largest |difference| over t {gap.max():.3f}")
    out(
        f"ESS: mean {float(np.mean(result.ess)):.0f}, min {float(np.min(result.ess)):.0f}; "
        f"resampled {int(np.sum(result.resampled))} of {num_steps} steps; "
        f"{elapsed:.2f} s (compilation included; run alongside the LM jobs)"
    )
    figures = {
        "log_z": float(result.log_evidence),
        "exact_log_z": float(log_z),
        "mean_T": last[0],
        "exact_mean_T": float(means[-1]),
        "exact_var_T": float(variances[-1]),
        "final_ess": result.final_ess,
        "filtering_mean": np.asarray(result.filtering_mean("x"), np.float64),  # the plotted series
        "exact_filtering_mean": np.asarray(means, np.float64),
        "exact_filtering_var": np.asarray(variances, np.float64),
        "ess": np.asarray(result.ess, np.float64),
    }
    return ys, result, means, figures


def run_hmm(num_particles: int = 2000, num_steps: int = 50, out=print):
    ys = simulate_hmm(1, num_steps, **HMM)
    ll = np.stack([-0.5 * (ys - m) ** 2 - 0.5 * np.log(2 * np.pi) for m in HMM["means"]], 1)
    log_z, filt = hmm_forward(HMM["init_probs"], HMM["transition"], ll)
    result = pp.infer(discrete_hmm(**HMM), ys, algorithm=pp.SMC(num_particles), key=0)
    last = np.asarray(result.samples["x"][:, -1])
    w = np.asarray(result.weights)
    smc_filter = np.array([w[last == k].sum() for k in range(3)])
    out(f"\n== Hidden Markov model: 3 states, T={num_steps}, N={num_particles} ==")
    out(f"log Z: SMC {result.log_evidence:.3f}   exact (forward algorithm) {log_z:.3f}")
    out(
        "p(x_T | y): SMC "
        + " ".join(f"{p:.3f}" for p in smc_filter)
        + "   exact "
        + " ".join(f"{p:.3f}" for p in filt[-1])
    )
    out(f"ESS: mean {float(np.mean(result.ess)):.0f}; resampled {int(np.sum(result.resampled))} times")
    out(str(result))
    figures = {
        "log_z": float(result.log_evidence),
        "exact_log_z": float(log_z),
        "filter_T": smc_filter,
        "exact_filter_T": np.asarray(filt[-1]),
        "final_ess": result.final_ess,
    }
    return result, figures


def plot(ys, lg_result, kalman_means, hmm_result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    ax.plot(ys, ".", color="0.6", label="observations")
    ax.plot(kalman_means, label="Kalman filter: E[x_t | y_0:t] (exact)")
    ax.plot(np.asarray(lg_result.filtering_mean("x")), "--", label="SMC filtering mean: E[x_t | y_0:t]")
    ax.set_title("Linear-Gaussian SSM")
    ax.set_xlabel("t")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(np.asarray(lg_result.ess), label="LGSSM")
    ax.plot(np.asarray(hmm_result.ess), label="HMM")
    ax.axhline(0.5 * lg_result.num_particles, color="k", lw=0.8, ls=":", label="resampling threshold")
    ax.set_title("ESS after each step (before resampling)")
    ax.set_xlabel("t")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# The function header the LM job asks for, after the prompt "def": a name and a parenthesised list
# of names separated by ", ", then a colon. Every match but those using a keyword as a name or
# repeating a parameter compiles; the Predicate below checks that part when the particle ends.
DEF_PATTERN = r" [a-z_]+\((?:[a-z_]+(?:, [a-z_]+)*)?\):"


def def_constraint():
    """The LM job's constraint: :data:`DEF_PATTERN` and ``def`` + the text compiles as Python."""
    from ppinfer.constraints import Predicate, Regex

    return Regex(DEF_PATTERN) & Predicate(parses_as_def)


def run_lm(
    num_particles: int = 128, max_new_tokens: int = 24, num_plain: int = 1024, html: Path | None = None
):
    """Constrained generation: plain sampling with rejection vs SMC under ``tk.constrained`` (the
    locally constrained proposal; the regex automaton's masks only allow tokens after which the text
    can still match *and end with EOS within the tokens left*, and EOS only where the text compiles,
    so a particle is not killed by the final checks)."""
    from ppinfer.lm import load_default

    lm = load_default()
    constraint = def_constraint()
    program = tk.constrained(tk.prompt(lm, "<|endoftext|>def", max_new_tokens), constraint)
    num_params = sum(x.size for x in jax.tree.leaves(lm.params))
    print(f"== Constrained generation with the embedded LM ({num_params:,} parameters) ==")
    print(
        f"prompt 'def', constraint: regex {DEF_PATTERN!r} + compiles as Python + EOS within "
        f"{max_new_tokens} tokens"
    )

    t0 = time.perf_counter()
    gen = jax.block_until_ready(
        lm.generate("<|endoftext|>def", key=0, num_particles=num_plain, max_new_tokens=max_new_tokens)
    )
    t_plain = time.perf_counter() - t0
    toks, lens = jax.device_get(gen)
    accepted = []
    for row, n in zip(toks, lens, strict=True):
        row = [int(t) for t in row[:n]]
        if row and row[-1] in lm.eos_ids:
            text = lm.tokenizer.decode(row[:-1])
            if constraint.validate(text):  # the regex (Python re) and the compile check
                accepted.append(text)
    print(
        f"plain sampling + rejection: {len(accepted)} of {num_plain} samples accepted "
        f"({len(accepted) / num_plain:.4f}); {t_plain:.1f} s (compilation included)"
    )

    algorithm = pp.SMC(num_particles)
    t0 = time.perf_counter()
    result = pp.infer(program, algorithm=algorithm, key=1)
    t_smc = time.perf_counter() - t0
    weighted = tk.texts(result)  # [(text, weight)] of the positive-weight particles
    print(
        f"SMC, N={num_particles}, locally constrained proposal: log Ẑ = {result.log_evidence:.2f} "
        f"(so rejection would accept about 1 in {np.exp(-result.log_evidence):.2g} samples); "
        f"ESS min {float(np.min(result.ess)):.1f}, final {result.final_ess:.1f} of {num_particles}; "
        f"{len(weighted)} particles of positive weight; resampled {int(np.sum(result.resampled))} "
        f"times; {t_smc:.1f} s (compilation included)"
    )
    valid = all(bool(re.fullmatch(DEF_PATTERN, t)) and parses_as_def(t) for t, _ in weighted)
    print(f"every particle with positive weight satisfies the constraint: {valid}")
    posterior: dict[str, float] = {}
    for text, wi in weighted:
        posterior[text] = posterior.get(text, 0.0) + wi
    print("top posterior samples:")
    for text, wi in sorted(posterior.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {wi:6.3f}  def{text}")
    if html is not None:
        result.to_html(html, title="The demo's LM job: SMC over tokens, prompt 'def'")
        print(f"HTML view of the run written to {html}")
    ctx = result.state.ctx
    toks, lens = jax.device_get((ctx.tokens, ctx.length))
    figures = {
        "num_particles": num_particles,
        "num_plain": num_plain,
        "num_accepted": len(accepted),
        "log_z": float(result.log_evidence),
        "final_ess": result.final_ess,
        "min_ess": float(np.min(result.ess)),
        "texts": [t for t, _ in tk.texts(result, all_particles=True)],
        "log_weights": np.asarray(result.log_weights, np.float64),
        "finished": [n > 0 and int(row[n - 1]) in lm.eos_ids for row, n in zip(toks, lens, strict=True)],
    }
    return result, figures


DEMO_SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["function", "class"]},
        "line": {"type": "integer", "minimum": 1, "maximum": 999},
    },
    "required": ["kind", "line"],
}


def run_json(num_particles: int = 128, max_new_tokens: int = 32) -> dict:
    """SMC under :data:`DEMO_SCHEMA` on the embedded LM; prints the heaviest documents and checks
    each weighted one against the schema."""
    from ppinfer.constraints import JSONSchema
    from ppinfer.lm import load_default

    schema = JSONSchema(DEMO_SCHEMA)
    print("== Structured output: a JSON schema as a constraint ==")
    program = tk.constrained(tk.prompt(load_default(), "<|endoftext|>entry = ", max_new_tokens), schema)
    t0 = time.perf_counter()
    result = pp.infer(program, algorithm=pp.SMC(num_particles), key=0)
    seconds = time.perf_counter() - t0
    texts = tk.texts(result)
    valid = all(schema.validate(text) for text, _ in texts)
    print(
        f"SMC, N={num_particles}: log Ẑ = {result.log_evidence:.2f}, {len(texts)} weighted documents, "
        f"all valid under the schema: {valid}; {seconds:.1f} s (compilation included)"
    )
    merged: dict[str, float] = {}
    for text, w in texts:  # resampled copies of one document, added up
        merged[text] = merged.get(text, 0.0) + w
    weights = np.array([w for _, w in texts])
    ess = float(1.0 / np.sum((weights / weights.sum()) ** 2))
    print(f"{len(merged)} distinct documents (ESS {ess:.0f} of {num_particles}); the heaviest:")
    for text, w in sorted(merged.items(), key=lambda kv: -kv[1])[:3]:
        print(f"  {w:6.3f}  {text}")
    return {
        "log_z": float(result.log_evidence),
        "texts": texts,
        "all_valid": valid,
        "distinct": len(merged),
        "ess": ess,
    }


def plot_lm(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppinfer.plots import plot_ess, plot_genealogy

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    plot_genealogy(result, axes[0])
    plot_ess(result, axes[1])
    axes[1].set_title("ESS per token")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> dict:
    """Runs the parts, prints them, writes the plots; returns each part's figures
    (``{"lm": …, "json": …, "lgssm": …, "hmm": …}``: the estimates next to the exact values)."""
    from concurrent.futures import ThreadPoolExecutor

    lines: list[str] = []

    def classic():  # compiled and run in a second thread, alongside the LM jobs; printed after them
        say = lambda *parts: lines.append(" ".join(map(str, parts)))  # noqa: E731
        return run_lgssm(out=say), run_hmm(out=say)

    with ThreadPoolExecutor(1) as pool:
        classic_parts = pool.submit(classic)
        lm_result, lm_figures = run_lm(html=REPO / "out" / "demo_lm.html")
        plot_lm(lm_result, REPO / "out" / "demo_lm.png")
        print(f"plot written to {REPO / 'out' / 'demo_lm.png'}\n")
        json_figures = run_json()
        print()
        (ys, lg_result, means, lg_figures), (hmm_result, hmm_figures) = classic_parts.result()
    print("\n".join(lines))
    path = REPO / "out" / "demo.png"
    plot(ys, lg_result, means, hmm_result, path)
    print(f"\nplot written to {path}")
    return {"lm": lm_figures, "json": json_figures, "lgssm": lg_figures, "hmm": hmm_figures}


if __name__ == "__main__":
    main()
