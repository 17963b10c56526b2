"""The same sharded SMC run under jax.distributed with two processes over loopback (JAX's CPU
collectives, gloo) gives the one-process log Ẑ, bit for bit. The two processes are given very
different chunk timings (one step per chunk, against whole-run chunks): a chunk schedule that
followed each process's clock would have them run different compiled chunks, whose collectives
never meet (a deadlock, seen on CI under load)."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import ppinfer as pp
from models.classic import lgssm, simulate_lgssm

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
    import ppinfer as pp
    from ppinfer import _talk
    _talk.FIRST_CHUNK = 1
    _talk.CHUNK_SECONDS = 0.0 if sys.argv[1] == "0" else 1e9
    from models.classic import lgssm, simulate_lgssm

    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    ys = simulate_lgssm(0, 20, 0.9, 0.5, 1.0, 1.0)
    r = pp.infer(lgssm(0.9, 0.5, 1.0, 1.0), ys, algorithm=pp.SMC(256, devices=4), key=3)
    print("LOGZ", repr(r.log_evidence), flush=True)
    """
)


def test_two_processes_match_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), f"127.0.0.1:{port}"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=150)
        finally:
            p.kill()
        assert p.returncode == 0, err[-3000:]
        outs.append(float(out.split("LOGZ")[1]))
    ys = simulate_lgssm(0, 20, 0.9, 0.5, 1.0, 1.0)
    single = pp.infer(lgssm(0.9, 0.5, 1.0, 1.0), ys, algorithm=pp.SMC(256), key=3).log_evidence
    assert outs[0] == outs[1] == single
    assert np.isfinite(single)
