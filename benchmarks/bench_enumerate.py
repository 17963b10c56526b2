"""Exact enumeration of a discrete HMM: batched (one compiled vmapped run per level of the execution
tree) against the eager path (one eager execution per branch), side by side.

Target: ``models.classic.discrete_hmm`` with K states (sticky transitions, Gaussian emissions) on
simulated data; the exact log evidence comes from the forward algorithm
(:func:`semantics.exact.hmm_forward`). Each run is ``pp.infer(program, ys,
algorithm=pp.Enumerate(batched=...))``. "executions" counts program runs (partial and complete),
from ``result.extras``.

1. Small HMM (``--small K,T``, default 2 states × 6 steps), both paths: the first batched call
   (compiles; the compiled run is then cached per program) against the first eager one, then
   interleaved medians over ``--reps`` further calls (batched warm): the speed-ups and the
   per-execution time of the eager path.
2. The 12-step HMM with 3 states (``--large K,T``; 3^12 = 531,441 paths), batched only, once: time,
   executions, |log Z − exact|; the eager path's time for it is *projected* (executions × its
   measured per-execution time on the small HMM), not run.
3. A token program that stops at EOS (a bigram ``NGramLM`` over ``a``, ``b`` and EOS, 6 tokens:
   ``pp.stop(tok == eos)``), both paths, first calls and warm medians: the batched path runs a
   stopped particle's later steps dormant (before, a program calling ``pp.stop`` always ran eagerly).

Ends with ``RESULT speedup_small=<old/new, warm> speedup_small_first=<old/new, first calls>
new_s_small=<> new_s_small_first=<> old_s_small=<> old_s_per_execution=<>
new_s_large=<> executions_large=<> paths_large=<> logz_abs_err_large=<> old_projected_h_large=<>
speedup_stop=<old/new, warm> speedup_stop_first=<old/new, first calls>``.
Timings are wall-clock on a shared CPU: noisy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppinfer as pp  # noqa: E402
from benchmarks._timing import interleaved_medians  # noqa: E402
from models.classic import discrete_hmm, simulate_hmm  # noqa: E402
from semantics.exact import hmm_forward  # noqa: E402

SCALE = 1.0


def hmm(k: int, t: int):
    init = np.full(k, 1.0 / k)
    trans = np.full((k, k), 0.2 / k) + np.eye(k) * 0.8
    means = np.arange(k, dtype=float)
    ys = simulate_hmm(0, t, init, trans, means, SCALE)
    program = discrete_hmm(init, trans, means, SCALE)
    log_lik = norm.logpdf(np.asarray(ys, np.float64)[:, None], means[None, :], SCALE)
    exact = hmm_forward(init, trans, log_lik)[0]
    return program, jnp.asarray(ys, jnp.float32), exact


def run(program, ys, batched: bool, max_branches: int = 10**6) -> pp.Result:
    return pp.infer(program, ys, algorithm=pp.Enumerate(batched=batched, max_branches=max_branches))


def token_program():
    """The bigram token program of section 3 and its prompt."""
    from ppinfer import tokens as tk
    from ppinfer.lm import NGramLM

    probs = np.array([[0, 0.5, 0.5, 0], [0, 0.2, 0.3, 0.5], [0, 0.6, 0.1, 0.3], [0.25] * 4])
    lm = NGramLM.from_probs(
        probs, bos_id=0, eos_id=3, vocab=["<s>", "a", "b", "</s>"], start=[0, 0.9, 0.1, 0]
    )
    prompt = tk.prompt(lm, "", max_new_tokens=6)

    def step(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())
        pp.stop(tok == p.eos_id)
        return ctx.extend(p, tok)

    return pp.sequential(tk.Context.start, step, 6), prompt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", default="2,6")
    ap.add_argument("--large", default="3,12")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    ks, ts = map(int, a.small.split(","))
    kl, tl = map(int, a.large.split(","))

    program, ys, exact = hmm(ks, ts)
    t0 = time.perf_counter()
    new = run(program, ys, True)
    new_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    old = run(program, ys, False)
    old_first = time.perf_counter() - t0
    assert new.extras["batched"] and not old.extras["batched"]
    np.testing.assert_allclose(new.log_evidence, old.log_evidence, rtol=1e-5)
    executions_small = old.extras["executions"]
    med = interleaved_medians(
        {"new": lambda s: run(program, ys, True), "old": lambda s: run(program, ys, False)}, a.reps
    )
    per_exec = med["old"] / executions_small
    print(
        f"small HMM K={ks} T={ts}: {new.num_particles} paths, {executions_small} executions; "
        f"log Z {new.log_evidence:.5f} (exact {exact:.5f})"
    )
    print(
        f"  eager {med['old']:.2f} s ({per_exec * 1e3:.1f} ms/execution), batched {med['new']:.2f} s "
        f"warm: speed-up {med['old'] / med['new']:.1f}x; first calls: eager {old_first:.2f} s, batched "
        f"{new_first:.2f} s (compiling): {old_first / new_first:.1f}x"
    )

    program, ys, exact = hmm(kl, tl)
    t0 = time.perf_counter()
    r = run(program, ys, True, max_branches=kl**tl)
    new_large = time.perf_counter() - t0
    err = abs(r.log_evidence - exact)
    projected_h = r.extras["executions"] * per_exec / 3600
    print(
        f"large HMM K={kl} T={tl}: {r.num_particles} paths, {r.extras['executions']} executions, "
        f"batched {new_large:.1f} s; log Z {r.log_evidence:.5f} (exact {exact:.5f}, |err| {err:.2e}); "
        f"eager projected {projected_h:.1f} h"
    )
    program, prompt = token_program()
    first = {}
    for name, batched in (("new", True), ("old", False)):
        t0 = time.perf_counter()
        out = pp.infer(program, prompt, algorithm=pp.Enumerate(batched=batched))
        first[name] = time.perf_counter() - t0
        assert out.extras["batched"] == batched
        first[name + "_logz"], first[name + "_n"] = out.log_evidence, out.num_particles
    assert first["new_n"] == first["old_n"]
    np.testing.assert_allclose(first["new_logz"], first["old_logz"], atol=1e-5)
    stop = interleaved_medians(
        {
            "new": lambda s: pp.infer(program, prompt, algorithm=pp.Enumerate(batched=True)),
            "old": lambda s: pp.infer(program, prompt, algorithm=pp.Enumerate(batched=False)),
        },
        a.reps,
    )
    print(
        f"token program with stop: {first['new_n']} paths; eager {stop['old']:.2f} s, batched "
        f"{stop['new']:.2f} s warm ({stop['old'] / stop['new']:.1f}x); first calls eager "
        f"{first['old']:.2f} s, batched {first['new']:.2f} s ({first['old'] / first['new']:.1f}x)"
    )
    print(
        f"RESULT speedup_small={med['old'] / med['new']:.2f} speedup_small_first={old_first / new_first:.2f} "
        f"new_s_small={med['new']:.2f} new_s_small_first={new_first:.2f} "
        f"old_s_small={med['old']:.2f} old_s_per_execution={per_exec:.4f} new_s_large={new_large:.1f} "
        f"executions_large={r.extras['executions']} paths_large={r.num_particles} "
        f"logz_abs_err_large={err:.2e} old_projected_h_large={projected_h:.1f} "
        f"speedup_stop={stop['old'] / stop['new']:.2f} speedup_stop_first={first['old'] / first['new']:.2f}"
    )


if __name__ == "__main__":
    main()
