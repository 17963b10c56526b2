"""Learned token-level twist vs the locally constrained sampler on the embedded LM.

Task: continue ``"<|endoftext|>def"`` with a Python function header matching
``models.lm_programs.PYTHON_DEF_PATTERN`` that ends with EOS within T tokens (a hard final
constraint: the locally constrained proposal sees the pattern but not the budget, so most of its
particles die at the last step). The twist head of ``ppinfer.vi.token_twist`` (automaton state,
step, the LM's last hidden state, the last token) is fitted by soft value iteration (its Bellman loss
is the mean squared incremental log weight of the twisted sampler); then R independent SMC runs with
N particles each compare:

- ``masked``: the locally constrained proposal, no twist (the same compiled program, twist strength 0);
- ``twisted``: the learned twist and its induced proposal ``q ∝ p · 1[allowed] · e^ψ``.

Both are valid samplers of the same target (``E[Ẑ] = Z``; ``tests/test_vi_token_twist.py``).
Reported per sampler: the mean per-step ESS / N (before each resampling decision, as
``bench_vi_proposal.py``), the ESS / N of the final weights (the weighted sample SMC returns), the
variance of ``log Ẑ`` over the runs with ``Ẑ > 0``, and the number of runs where every particle died
(``Ẑ = 0``). The full run also prints a reference ``log Z`` (10 twisted runs with 8N particles).

    python benchmarks/bench_vi_token_twist.py [--quick]

Ends with ``RESULT token_ess_gain=<twisted/masked final ESS> token_logz_var_ratio=<masked/twisted
var log Ẑ> token_step_ess_gain=<twisted/masked mean per-step ESS> train_s=<training seconds>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppinfer as pp  # noqa: E402
from models.lm_programs import PYTHON_DEF_PATTERN  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.algorithms.smc import run_loop  # noqa: E402
from ppinfer.constraints import regex_automaton  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402
from ppinfer.vi import token_twist as tt  # noqa: E402


def replicate(p, automaton, program, n, reps, seed):
    """A jitted ``run(twist) -> (log Ẑ: f[R], mean step ESS/N: f[R], final ESS/N: f[R])`` of R
    independent SMC runs; the twist (and its strength) is an argument: one compilation for both."""
    keys = jax.random.split(jax.random.PRNGKey(seed), reps)

    @jax.jit
    def run(twist):
        def one(k):
            args = (p, automaton, twist)
            out = run_loop(k, program, args, pp.SMC(n, proposal=tt.twisted_proposal).loop(program, args))
            lw = out["log_weights"]
            final = jnp.exp(2 * jax.nn.logsumexp(lw) - jax.nn.logsumexp(2 * lw)) / n
            return out["log_evidence"], jnp.mean(out["ess"]) / n, jnp.nan_to_num(final)

        return jax.vmap(one)(keys)

    return lambda twist: tuple(np.asarray(x) for x in run(twist))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small run (< 60 s on an idle 2-core CPU)")
    opts = parser.parse_args()
    t_max, n, reps, iters = (14, 32, 20, 25) if opts.quick else (14, 32, 100, 40)
    lm = load_default()
    automaton = regex_automaton(PYTHON_DEF_PATTERN, lm.vocab_bytes, lm.eos_id)
    p = tk.prompt(lm, "<|endoftext|>def", t_max)
    program = tt.twisted_program(t_max)

    t0 = time.perf_counter()
    init = tt.init_token_twist(0, automaton, tt.hidden_state_features(lm), t_max, hidden=32)
    twist, info = tt.fit_token_twist(
        1, p, automaton, init, num_iterations=iters, num_rollouts=64, updates_per_iteration=20,
        optimizer=optax.adam(2e-2),
    )  # fmt: skip
    train_s = time.perf_counter() - t0

    run = replicate(p, automaton, program, n, reps, seed=7)
    rows = []
    for name, tw in (("masked", twist.off()), ("twisted", twist)):
        t1 = time.perf_counter()
        log_z, step_ess, final_ess = run(tw)
        ok = np.isfinite(log_z)
        rows.append((name, float(np.mean(step_ess)), float(np.mean(final_ess)), float(np.var(log_z[ok])),
                     int(np.sum(~ok)), float(np.mean(log_z[ok])), time.perf_counter() - t1))  # fmt: skip

    print(f"Task: 'def' + header matching {PYTHON_DEF_PATTERN!r} + EOS within T={t_max} tokens (embedded LM)")
    print(f"SMC: N={n} particles, R={reps} independent runs per sampler, systematic resampling at ESS < N/2")
    print(
        f"twist training: {iters} iterations x 64 rollouts x 20 Adam steps in {train_s:.1f} s "
        f"(compilation included); Bellman loss (out of sample) first 3 mean "
        f"{np.mean(info.loss_trace[:3]):.3f} -> last 3 mean {np.mean(info.loss_trace[-3:]):.3f}"
    )
    print(f"{'sampler':<8} {'step ESS/N':>10} {'final ESS/N':>11} {'var logZ':>9} {'Z=0 runs':>8} "
          f"{'mean logZ':>9} {'seconds':>8}")  # fmt: skip
    for name, s_ess, f_ess, var, dead, mean, sec in rows:
        print(f"{name:<8} {s_ess:>10.3f} {f_ess:>11.3f} {var:>9.4f} {dead:>8d} {mean:>9.3f} {sec:>8.1f}")
    if not opts.quick:
        ref = replicate(p, automaton, program, 8 * n, 10, seed=11)(twist)[0]
        sem = np.std(ref) / np.sqrt(10)
        print(f"reference log Z (10 twisted runs, N={8 * n}): {np.mean(ref):.3f} ± {sem:.3f}")
    (_, s0, f0, v0, *_), (_, s1, f1, v1, *_) = rows
    print(
        f"RESULT token_ess_gain={f1 / f0:.2f} token_logz_var_ratio={v0 / v1:.2f} "
        f"token_step_ess_gain={s1 / s0:.2f} train_s={train_s:.1f}"
    )


if __name__ == "__main__":
    main()
