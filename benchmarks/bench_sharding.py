"""Particle-sharded SMC on forced CPU devices vs the same SMC on one device.

Re-executes itself with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``: the 4 "devices" share
this machine's cores, so total compute is the same and the ratio measures what partitioning and
cross-device resampling add. Bootstrap filter on the linear-Gaussian SSM (T = 100), N growing.
The resampling share is estimated as (time resampling every step − time never resampling) ÷ time
resampling every step, on 4 devices. On a GPU machine, pass ``--devices 1`` to see single-device
throughput. Ends with ``RESULT sharding_overhead_4dev=<x> resample_fraction=<x>`` (sharded time ÷
one-device time, and the resampling share, at the largest N).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--devices", type=int, default=4)
    opts = parser.parse_args()
    if os.environ.get("_PPINFER_BENCH_CHILD") != "1":
        env = dict(os.environ, _PPINFER_BENCH_CHILD="1", PYTHONPATH=str(ROOT))
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={opts.devices}"
        sys.exit(subprocess.call([sys.executable, __file__, *sys.argv[1:]], env=env))

    import jax
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import ppinfer as pp
    from models.classic import lgssm, simulate_lgssm

    ys = simulate_lgssm(0, 100, 0.9, 0.5, 1.0, 1.0)
    model = lgssm(0.9, 0.5, 1.0, 1.0)
    sizes = [4096, 16384, 65536] if opts.quick else [4096, 16384, 65536, 262144]
    reps = 3 if opts.quick else 7

    def timed(algorithm):
        pp.infer(model, ys, algorithm=algorithm, key=0)
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            pp.infer(model, ys, algorithm=algorithm, key=i + 1)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"{len(jax.devices())} devices ({jax.devices()[0].platform}); LGSSM bootstrap SMC, T=100")
    print(f"{'N':>8}{'1 device s':>12}{'sharded s':>11}{'ratio':>7}{'resample share':>16}")
    results = {}
    for n in sizes:
        single = timed(pp.SMC(n))
        sharded = timed(pp.SMC(n, devices=len(jax.devices())))
        always = timed(pp.SMC(n, ess_threshold=1.0, devices=len(jax.devices())))
        never = timed(pp.SMC(n, ess_threshold=0.0, devices=len(jax.devices())))
        share = max(always - never, 0.0) / always
        results[n] = (sharded / single, share)
        print(f"{n:>8}{single:>12.4f}{sharded:>11.4f}{sharded / single:>7.2f}{share:>16.2f}")
    a = pp.infer(model, ys, algorithm=pp.SMC(4096), key=7)
    b = pp.infer(model, ys, algorithm=pp.SMC(4096, devices=len(jax.devices())), key=7)
    same = bool(np.array_equal(np.asarray(a.log_weights), np.asarray(b.log_weights)))
    print(f"sharded result bit-identical to one device: {same}")
    ratio, share = results[sizes[-1]]
    print(f"RESULT sharding_overhead_4dev={ratio:.3f} resample_fraction={share:.3f}")


if __name__ == "__main__":
    main()
