"""Sequential vs batch IBIS on posteriordb's arK (AR(5), 200 points) against the reference draws.

    python benchmarks/bench_updates_posteriordb.py [--quick] [--runs R] [--particles N] [--moves M]

The 195 observations are split into 5 batches of 39 (each batch carries the K = 5 lags its first
observation needs, so the likelihood factorises exactly). For each of R seeds, IBIS absorbs the
batches update by update (``infer`` then ``Posterior.update``), and separately all 195 observations
in one batch. Printed per parameter: the reference mean and sd (Stan, 10 000 draws), the pooled
sequential and one-batch means, their errors in reference sds, the tolerance of
``tests/test_mcmc_posteriordb.py`` (``max(3·MCSE, 0.1·sd)``, MCSE = sd over runs / √R) and
error / tolerance; then the spread of a single run's error, the log evidence of both paths next to
an independent estimate (importance sampling from a Student-t fitted to the reference draws), the
time per run, and (full mode) plain IBIS without tempering. ``RESULT max_err_over_tol=<x>`` is the
largest error / tolerance of the pooled sequential and one-batch means (≤ 1 passes).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from scipy import stats

import ppinfer as pp
from models.posteriordb import ROOT, ark, flatten_draws, load, reference
from ppinfer.updates import IBIS

NAME = "arK-arK"
K, BATCH = 5, 39


def ark5(y):
    return ark(y, K)


def weighted_means(post) -> dict[str, float]:
    w = np.exp(np.asarray(post.log_weights, np.float64) - float(np.max(post.log_weights)))
    w /= w.sum()
    return {k: float(np.sum(w * v)) for k, v in flatten_draws(post.samples).items()}


def exact_log_evidence(y: np.ndarray, num: int = 200_000) -> tuple[float, float]:
    """log p(y_{6:200}) by importance sampling (float64) from a Student-t(5) fitted to the reference
    draws in (alpha, beta, log sigma); returns (estimate, its standard error)."""
    with open(os.path.join(ROOT, NAME, "reference_draws.json")) as f:
        chains = json.load(f)
    cols = ["alpha"] + [f"beta[{i}]" for i in range(1, K + 1)]
    draws = np.concatenate(
        [np.column_stack([np.asarray(c[k]) for k in cols] + [np.log(np.asarray(c["sigma"]))]) for c in chains]
    )
    q = stats.multivariate_t(draws.mean(0), np.cov(draws.T), df=5)
    th = q.rvs(num, random_state=np.random.default_rng(0))
    y = np.asarray(y, np.float64)
    lags = np.column_stack([y[K - k - 1 : len(y) - k - 1] for k in range(K)])
    a, b, log_s = th[:, 0], th[:, 1 : K + 1], th[:, K + 1]
    s = np.exp(log_s)
    log_prior = (
        stats.norm.logpdf(a, 0, 10)
        + stats.norm.logpdf(b, 0, 10).sum(1)
        + np.log(2)
        + stats.cauchy.logpdf(s, 0, 2.5)
        + log_s
    )
    resid = y[K:][None, :] - a[:, None] - b @ lags.T
    log_lik = stats.norm.logpdf(resid, 0, s[:, None]).sum(1)
    lw = log_prior + log_lik - q.logpdf(th)
    m = lw.max()
    w = np.exp(lw - m)
    return float(m + np.log(w.mean())), float(w.std() / w.mean() / np.sqrt(num))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 runs (under a minute of CPU)")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--moves", type=int, default=10)
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 8)
    cfg = IBIS(num_particles=args.particles, num_moves=args.moves)
    _, (y, k) = load(NAME)
    assert k == K
    bs = [y[b * BATCH : b * BATCH + BATCH + K] for b in range((len(y) - K) // BATCH)]
    ref = reference(NAME)
    print(
        f"{NAME}: {len(y) - K} observations in {len(bs)} batches of {BATCH}; {runs} runs of "
        f"IBIS(N={cfg.num_particles}, moves={cfg.num_moves})"
    )

    seq, one, lz_seq, lz_one, t_seq, t_one, stages = [], [], [], [], [], [], []
    for seed in range(runs):
        t0 = time.perf_counter()
        post = pp.infer(ark5, bs[0], algorithm=cfg, key=seed)
        for b in bs[1:]:
            post = post.update(b)
        jax.block_until_ready(post.log_weights)
        t_seq.append(time.perf_counter() - t0)
        seq.append(weighted_means(post))
        lz_seq.append(post.log_evidence)
        stages.append(post.extras["stages"].tolist())
        t0 = time.perf_counter()
        whole = pp.infer(ark5, y, algorithm=cfg, key=100 + seed)
        jax.block_until_ready(whole.log_weights)
        t_one.append(time.perf_counter() - t0)
        one.append(weighted_means(whole))
        lz_one.append(whole.log_evidence)

    def pool(rs):
        m = {p: float(np.mean([r[p] for r in rs])) for p in ref}
        se = {p: float(np.std([r[p] for r in rs], ddof=1) / np.sqrt(len(rs))) for p in ref}
        return m, se

    (sm, sse), (om, ose) = pool(seq), pool(one)
    cols = ("ref mean", "ref sd", "seq mean", "one-batch", "seq err/sd", "one err/sd")
    cols += ("seq err/tol", "one err/tol")
    head = f"{'param':8} " + " ".join(f"{c:>11}" for c in cols)
    print(head)
    worst = 0.0
    for p, r in ref.items():
        tol_s = max(3 * sse[p], 0.1 * r["sd"])
        tol_o = max(3 * ose[p], 0.1 * r["sd"])
        es, eo = abs(sm[p] - r["mean"]), abs(om[p] - r["mean"])
        worst = max(worst, es / tol_s, eo / tol_o)
        row = (r["mean"], r["sd"], sm[p], om[p], (sm[p] - r["mean"]) / r["sd"], (om[p] - r["mean"]) / r["sd"])
        print(f"{p:8} " + " ".join(f"{v:11.4f}" for v in row) + f" {es / tol_s:11.2f} {eo / tol_o:11.2f}")
    per_run = lambda rs: [max(abs(r[p] - ref[p]["mean"]) / ref[p]["sd"] for p in ref) for r in rs]
    spread = lambda rs: float(
        np.sqrt(np.mean([((r[p] - ref[p]["mean"]) / ref[p]["sd"]) ** 2 for r in rs for p in ref]))
    )
    print(f"single run, max |err|/sd over parameters: sequential {np.round(per_run(seq), 3).tolist()}")
    print(f"                                          one-batch  {np.round(per_run(one), 3).tolist()}")
    print(f"single run, rms err/sd: sequential {spread(seq):.3f}, one-batch {spread(one):.3f}")
    print(f"tempering stages per update (sequential, seed 0): {stages[0]}")
    if not args.quick:
        # Plain IBIS (no tempering), seed 0: the first batch collapses the particles onto a prior draw.
        plain = IBIS(num_particles=args.particles, num_moves=args.moves, tempering_ess=None)
        post = pp.infer(ark5, bs[0], algorithm=plain, key=0)
        for b in bs[1:]:
            post = post.update(b)
        errs = {
            p: round((m - ref[p]["mean"]) / ref[p]["sd"], 1)
            for p, m in weighted_means(post).items()
            if p in ref
        }
        print(
            f"plain IBIS (tempering_ess=None), seed 0: err/sd {errs}; "
            f"ESS per update {np.round(post.ess, 1).tolist()}"
        )
    exact, exact_se = exact_log_evidence(y)
    print(
        f"log evidence: sequential {np.round(lz_seq, 2).tolist()}, one-batch {np.round(lz_one, 2).tolist()}, "
        f"importance sampling {exact:.2f} (rel. se {exact_se:.1e})"
    )
    print(
        f"time per run (first one includes compilation): sequential {np.round(t_seq, 2).tolist()} s, "
        f"one-batch {np.round(t_one, 2).tolist()} s"
    )
    late_seq = float(np.median(t_seq[1:])) if runs > 1 else t_seq[0]
    late_one = float(np.median(t_one[1:])) if runs > 1 else t_one[0]
    print(
        f"RESULT max_err_over_tol={worst:.3f} seq_rms_err_sd={spread(seq):.3f} "
        f"one_rms_err_sd={spread(one):.3f} "
        f"log_z_seq={np.mean(lz_seq):.2f} log_z_one={np.mean(lz_one):.2f} log_z_is={exact:.2f} "
        f"seq_s={late_seq:.2f} one_s={late_one:.2f} seq_over_one={late_seq / late_one:.2f}"
    )


if __name__ == "__main__":
    main()
