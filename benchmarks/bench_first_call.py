"""First-call times, cold and warm: how long a new process waits for its first result.

Cases (each in a fresh Python process):

- ``regex``: a token program — SMC(16) on the embedded LM, generation constrained by a regular
  expression (``tk.constrained(prompt, Regex(...))``, the locally constrained proposal), up to 24
  new tokens;
- ``nuts``: ``MCMC(NUTS())`` on the centred eight-schools model, 4 chains × (500 warm-up + 500)
  transitions.

Each case runs twice with the persistent compilation cache on and ``PPINFER_CACHE_DIR`` a fresh
temporary folder: the first process compiles (**cold**), the second loads the compiled programs
from that folder (**warm**). A process reports the import time, its first call (host-side checks,
compilation or cache load, and the run) and a second call in the same process with a new key
(the run alone). The compile notice (``ppinfer._talk``) is left on, so its lines appear too.

Timings on a shared CPU are noisy; run ``python benchmarks/bench_first_call.py`` (``--case`` to run
one). Ends with ``RESULT regex_cold_s=… regex_warm_s=… regex_run_s=… nuts_cold_s=… nuts_warm_s=…
nuts_run_s=…`` (first-call seconds cold and warm, and the in-process second call).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def case_regex() -> tuple:
    import ppinfer as pp
    from ppinfer import tokens as tk
    from ppinfer.constraints import Regex
    from ppinfer.lm import load_default

    lm = load_default()
    program = tk.constrained(
        tk.prompt(lm, "<|endoftext|>x = ", max_new_tokens=24), Regex(r"[a-z_]{2,10}\(\)")
    )
    return lambda key: pp.infer(program, algorithm=pp.SMC(16), key=key)


def case_nuts() -> tuple:
    import numpy as np
    import numpyro.distributions as dist

    import ppinfer as pp

    y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], np.float32)
    sigma = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], np.float32)

    def eight_schools(y, sigma):
        mu = pp.sample("mu", dist.Normal(0.0, 5.0))
        tau = pp.sample("tau", dist.HalfCauchy(5.0))
        with pp.plate("J", 8):
            theta = pp.sample("theta", dist.Normal(mu, tau))
            pp.observe("y", dist.Normal(theta, sigma), y)

    algorithm = pp.MCMC(pp.NUTS(), num_samples=500, num_warmup=500)

    def run(key):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its divergences are expected
            return pp.infer(eight_schools, y, sigma, algorithm=algorithm, key=key)

    return run


CASES = {"regex": case_regex, "nuts": case_nuts}


def child(name: str) -> None:
    t0 = time.perf_counter()
    import ppinfer  # noqa: F401

    t_import = time.perf_counter() - t0
    run = CASES[name]()
    t1 = time.perf_counter()
    run(0)
    first = time.perf_counter() - t1
    t2 = time.perf_counter()
    run(1)
    second = time.perf_counter() - t2
    print(f"TIMES import={t_import:.2f} first={first:.2f} second={second:.2f}", flush=True)


def measure(name: str, cache: str) -> dict:
    env = {
        **os.environ,
        "PPINFER_CACHE_DIR": cache,
        "PPINFER_COMPILATION_CACHE": "1",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", name], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    notices = [line for line in out.stderr.splitlines() if line.startswith("ppinfer:")]
    for line in notices:
        print(f"    {line}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("TIMES"))
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def _line(t: dict) -> str:
    return f"  import {t['import']:.1f} s, first call {t['first']:.1f} s, second {t['second']:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--child", choices=sorted(CASES))
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    result = {}
    for name in args.case or ["regex", "nuts"]:
        with tempfile.TemporaryDirectory() as cache:
            print(f"{name}: cold process (empty cache {cache})")
            cold = measure(name, cache)
            print(_line(cold))
            print(f"{name}: warm process (same cache)")
            warm = measure(name, cache)
            print(_line(warm))
        result.update(
            {
                f"{name}_cold_s": cold["first"],
                f"{name}_warm_s": warm["first"],
                f"{name}_run_s": warm["second"],
            }
        )
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
