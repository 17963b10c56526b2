"""Steer (N particles × K extensions) vs SMC with N·K particles: same forward passes, same process.

Embedded default LM, prompt ``<|endoftext|>import``, constraint: text avoiding the letter ``e``
(regex automaton; the locally constrained proposal, LM × allowed-token mask, weighted by the allowed
mass; with ``--bootstrap`` the LM itself, so siblings' weights differ). Both algorithms run N·K
forward passes per token; SMC resamples (systematic) when ESS < N·K/2, Steer selects N of its N·K
children every step (Fearnhead–Clifford). Figures over R seeds: the variance of ``log Ẑ`` (Ẑ is
unbiased for both: a lower variance is a better estimator), the mean ``log Ẑ``, and the median wall
time after compilation (interleaved runs). SMC with N particles (as many survivors as Steer, K times
fewer forward passes) is shown for context.

Ends with ``RESULT steer_over_smc_logz_var=<x> steer_over_smc_time=<y> steer_over_smc_n_logz_var=<z>``
(Steer ÷ SMC(N·K), and the log Ẑ variance ratio against SMC(N)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_medians  # noqa: E402
from bench_lm_smc import PATTERN, constrained_program  # noqa: E402

import ppinfer as pp  # noqa: E402
from ppinfer.algorithms.steer import Steer  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402


def no_e_program(lm, max_new_tokens: int):
    """The program of ``bench_lm_smc.py``: text avoiding the letter e (regex automaton, stop at EOS)."""
    return constrained_program(lm, max_new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer seeds")
    parser.add_argument(
        "--bootstrap", action="store_true", help="propose from the LM itself (no mask): siblings differ"
    )
    opts = parser.parse_args()
    n, k, t_max, seeds = (8, 4, 16, 8) if opts.quick else (16, 4, 32, 24)

    lm = load_default()
    program, args, proposal = no_e_program(lm, t_max)
    proposal = None if opts.bootstrap else proposal
    algorithms = {
        "SMC": pp.SMC(n * k, proposal=proposal),
        "Steer": Steer(n, k, proposal=proposal),
        "SMC_N": pp.SMC(n, proposal=proposal),
    }
    compile_s, log_z, kept = {}, {name: [] for name in algorithms}, []
    for name, algorithm in algorithms.items():
        t0 = time.perf_counter()
        pp.infer(program, *args, algorithm=algorithm, key=0)
        compile_s[name] = time.perf_counter() - t0
    for seed in range(seeds):
        for name, algorithm in algorithms.items():
            r = pp.infer(program, *args, algorithm=algorithm, key=seed)
            log_z[name].append(r.log_evidence)
            if name == "Steer":
                kept.append(float(np.mean(np.asarray(r.extras["num_kept"]))))
    runs = {
        name: (lambda seed, a=a: pp.infer(program, *args, algorithm=a, key=seed))
        for name, a in algorithms.items()
    }
    medians = interleaved_medians(runs, 3 if opts.quick else 5)

    print(
        f"{'bootstrap' if opts.bootstrap else 'locally constrained'} proposal, "
        f"embedded LM, {t_max} new tokens, regex {PATTERN!r}, N·K = {n * k}, {seeds} seeds, "
        f"device={jax.devices()[0].platform}"
    )
    print(f"{'':<22}{'var log Z':>11}{'mean log Z':>12}{'median s':>10}{'compile s':>11}")
    for name in algorithms:
        label = {"SMC": f"SMC({n * k})", "Steer": f"Steer({n}, {k})", "SMC_N": f"SMC({n})"}[name]
        z = np.asarray(log_z[name])
        print(
            f"{label:<22}{z.var(ddof=1):>11.4f}{z.mean():>12.3f}{medians[name]:>10.3f}{compile_s[name]:>11.1f}"
        )
    print(f"Steer: on average {np.mean(kept):.1f} of {n} survivors per step kept deterministically")
    var_ratio = np.var(log_z["Steer"], ddof=1) / np.var(log_z["SMC"], ddof=1)
    time_ratio = medians["Steer"] / medians["SMC"]
    var_ratio_n = np.var(log_z["Steer"], ddof=1) / np.var(log_z["SMC_N"], ddof=1)
    print(
        f"RESULT steer_over_smc_logz_var={var_ratio:.3f} steer_over_smc_time={time_ratio:.3f} "
        f"steer_over_smc_n_logz_var={var_ratio_n:.3f}"
    )


if __name__ == "__main__":
    main()
