"""Tutorial: sequential Bayesian updates — the posterior after each batch becomes the next prior.

1. A classic stream: a coin's bias from batches of flips, IBIS update by update, against the exact
   Beta posterior after every batch (means and 90% intervals, plotted).
2. Save after batch 5, load in a "new process" and resume: the result is bit-identical.
3. An LM stream: which of three styles of the embedded language model wrote a stream of texts,
   updated after each text (``examples/updates_lm_style.py``), plotted.
"""

import importlib.util
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from scipy import stats  # noqa: E402
from scipy.special import betaln  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: examples/
import ppinfer as pp  # noqa: E402
from ppinfer.updates import IBIS, load, save  # noqa: E402

OUT = Path(__file__).resolve().parent / "_generated"
OUT.mkdir(exist_ok=True)

# --- 1. A classic stream -------------------------------------------------------------------------
# p ~ Beta(2, 2); each batch is 10 flips of a coin with P(heads) = 0.3. The program is written for
# ONE batch; IBIS keeps every batch so far and its moves target the posterior given all of them.
A, B = 2.0, 2.0


def coin(flips):
    p = pp.sample("p", dist.Beta(A, B))
    with pp.plate("n", flips.shape[0]):
        pp.observe("flips", dist.Bernoulli(p), flips)


T, SIZE = 12, 10
flips = np.random.default_rng(3).binomial(1, 0.3, (T, SIZE)).astype(np.int32)

algorithm = IBIS(num_particles=2000, num_moves=5)
post = pp.infer(coin, flips[0], algorithm=algorithm, key=0)
snapshots = [post]
for batch in flips[1:]:
    post = post.update(batch)  # a new Posterior; the old one is unchanged
    snapshots.append(post)


def weighted_quantiles(x, log_w, qs):
    order = np.argsort(x)
    w = np.exp(log_w[order] - log_w.max())
    cdf = np.cumsum(w) / w.sum()
    return np.interp(qs, cdf, x[order])


print("after batch t: IBIS mean [90% interval]  vs  exact Beta posterior mean [90% interval]")
rows = []
for t, s in enumerate(snapshots, start=1):
    heads = flips[:t].sum()
    exact = stats.beta(A + heads, B + t * SIZE - heads)
    x, lw = np.asarray(s.samples["p"]), np.asarray(s.log_weights)
    lo, hi = weighted_quantiles(x, lw, [0.05, 0.95])
    rows.append((float(s.mean("p")), lo, hi, exact.mean(), *exact.ppf([0.05, 0.95])))
    print(
        f"  t={t:2d}: {rows[-1][0]:.3f} [{lo:.3f}, {hi:.3f}]   exact {exact.mean():.3f} "
        f"[{rows[-1][4]:.3f}, {rows[-1][5]:.3f}]   ESS {float(s.ess[-1]):6.0f}, "
        f"resampled {bool(s.resampled[-1])}"
    )

# The evidence accumulates: log Ẑ(1:T) = Σ_t log Ẑ(t | 1:t−1), next to the exact Beta-Bernoulli
# marginal likelihood.
heads = flips.sum()
exact_log_z = betaln(A + heads, B + flips.size - heads) - betaln(A, B)
print(
    f"log Ẑ = {post.log_evidence:.3f} (sum of the {T} increments: "
    f"{post.log_evidence_increments.sum():.3f}), exact log p(flips) = {exact_log_z:.3f}"
)

rows = np.asarray(rows)
fig, ax = plt.subplots(figsize=(6, 3.2))
t = np.arange(1, T + 1)
ax.fill_between(t, rows[:, 4], rows[:, 5], color="0.85", label="exact 90% interval")
ax.plot(t, rows[:, 3], "k--", label="exact mean")
ax.errorbar(t, rows[:, 0], yerr=[rows[:, 0] - rows[:, 1], rows[:, 2] - rows[:, 0]], fmt="o", label="IBIS")
ax.set_xlabel("batches absorbed (10 flips each)")
ax.set_ylabel("P(heads)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "sequential_updates_coin.png", dpi=100)

# --- 2. Save, load, resume ------------------------------------------------------------------------
# A posterior is saved as safetensors + JSON (no pickle): particles, weights, random key, step count,
# the data so far and the program's identity. Loading it and absorbing the remaining batches gives
# the same bits as the uninterrupted run above.
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "coin.safetensors"
    save(snapshots[4], path)  # after 5 batches
    resumed = load(path, coin)
    print(f"\nloaded {path.name}: step {resumed.step}, {path.stat().st_size} bytes")
    for batch in flips[5:]:
        resumed = resumed.update(batch)
same = np.array_equal(np.asarray(resumed.ibis.particles), np.asarray(post.ibis.particles)) and np.array_equal(
    np.asarray(resumed.log_weights), np.asarray(post.log_weights)
)
print(
    f"resumed after batch 5 and ran to batch {resumed.step}: bit-identical to the uninterrupted run: {same}"
)

# --- 3. An LM stream ------------------------------------------------------------------------------
# Texts arrive one at a time; each is scored under three "styles" (prompts) of the embedded LM. The
# posterior over which style wrote the stream is updated exactly after each text (the posterior is
# the next prior), and IBIS tracks the posterior over the styles' mixture proportions.
spec = importlib.util.spec_from_file_location("updates_lm_style", ROOT / "examples" / "updates_lm_style.py")
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
print()
example.main(num_particles=1000, plot=str(OUT / "sequential_updates_lm.png"))
