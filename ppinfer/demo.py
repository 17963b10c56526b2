"""The main job (``make demo``): SMC on two state-space models with exact answers.

1. A linear-Gaussian state-space model (T = 100): bootstrap SMC vs the exact Kalman filter.
2. A 3-state hidden Markov model (T = 50): SMC filtering marginals vs the forward algorithm.

Prints posterior summaries, log Ẑ against the exact log Z, ESS and resampling counts, and writes a
plot of ESS over time and the filtering means (``out/demo.png``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the model zoo lives in the repository's models/ folder
    sys.path.insert(0, str(REPO))

import ppinfer as pp  # noqa: E402
from models.classic import discrete_hmm, lgssm, simulate_hmm, simulate_lgssm  # noqa: E402
from semantics import hmm_forward, kalman_filter  # noqa: E402

LG = dict(a=0.9, q=0.5, c=1.0, r=1.0)
HMM = dict(
    init_probs=[0.5, 0.3, 0.2],
    transition=[[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.1, 0.1, 0.8]],
    means=[-2.0, 0.0, 2.0],
    scale=1.0,
)


def run_lgssm(num_particles: int = 2000, num_steps: int = 100):
    ys = simulate_lgssm(0, num_steps, **LG)
    log_z, means, variances = kalman_filter(LG["a"], LG["q"], LG["c"], LG["r"], 0.0, 1.0, ys)
    t0 = time.perf_counter()
    result = pp.infer(lgssm(**LG), ys, algorithm=pp.SMC(num_particles), key=0)
    elapsed = time.perf_counter() - t0
    print(f"== Linear-Gaussian SSM: T={num_steps}, N={num_particles} (bootstrap SMC) ==")
    print(
        f"log Z: SMC {result.log_evidence:.3f}   exact (Kalman) {log_z:.3f}   "
        f"error {result.log_evidence - log_z:+.3f}"
    )
    last = float(result.mean("x")[-1]), float(result.std("x")[-1])
    print(
        f"x_T posterior: SMC mean {last[0]:.3f} sd {last[1]:.3f}   "
        f"exact mean {means[-1]:.3f} sd {np.sqrt(variances[-1]):.3f}"
    )
    print(
        f"ESS: mean {float(np.mean(result.ess)):.0f}, min {float(np.min(result.ess)):.0f}; "
        f"resampled {int(np.sum(result.resampled))} of {num_steps} steps; "
        f"{elapsed:.2f} s (compilation included)"
    )
    return ys, result, means


def run_hmm(num_particles: int = 2000, num_steps: int = 50):
    ys = simulate_hmm(1, num_steps, **HMM)
    ll = np.stack([-0.5 * (ys - m) ** 2 - 0.5 * np.log(2 * np.pi) for m in HMM["means"]], 1)
    log_z, filt = hmm_forward(HMM["init_probs"], HMM["transition"], ll)
    result = pp.infer(discrete_hmm(**HMM), ys, algorithm=pp.SMC(num_particles), key=0)
    last = np.asarray(result.samples["x"][:, -1])
    w = np.asarray(result.weights)
    smc_filter = np.array([w[last == k].sum() for k in range(3)])
    print(f"\n== Hidden Markov model: 3 states, T={num_steps}, N={num_particles} ==")
    print(f"log Z: SMC {result.log_evidence:.3f}   exact (forward algorithm) {log_z:.3f}")
    print(
        "p(x_T | y): SMC "
        + " ".join(f"{p:.3f}" for p in smc_filter)
        + "   exact "
        + " ".join(f"{p:.3f}" for p in filt[-1])
    )
    print(
        f"ESS: mean {float(np.mean(result.ess)):.0f}; resampled {int(np.sum(result.resampled))} times"
    )
    print(result)
    return result


def plot(ys, lg_result, kalman_means, hmm_result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    ax.plot(ys, ".", color="0.6", label="observations")
    ax.plot(kalman_means, label="Kalman filtering mean (exact)")
    ax.plot(np.asarray(lg_result.mean("x")), "--", label="SMC smoothing mean (genealogy)")
    ax.set_title("Linear-Gaussian SSM")
    ax.set_xlabel("t")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(np.asarray(lg_result.ess), label="LGSSM")
    ax.plot(np.asarray(hmm_result.ess), label="HMM")
    ax.axhline(
        0.5 * lg_result.num_particles, color="k", lw=0.8, ls=":", label="resampling threshold"
    )
    ax.set_title("ESS after each step (before resampling)")
    ax.set_xlabel("t")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ys, lg_result, means = run_lgssm()
    hmm_result = run_hmm()
    path = REPO / "out" / "demo.png"
    plot(ys, lg_result, means, hmm_result, path)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    main()
