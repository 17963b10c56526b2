"""JAX's persistent compilation cache is on by default (in PPINFER_CACHE_DIR or the user's cache
folder), can be turned off, and a second process loads what the first compiled."""

import os
import subprocess
import sys

import numpy as np

SCRIPT = """
import jax, numpy as np, ppinfer as pp, numpyro.distributions as dist
print("DIR", jax.config.jax_compilation_cache_dir)
def init():
    return pp.sample("x", dist.Normal(0.0, 1.0))
def step(x, t, ys):
    x = pp.sample("x", dist.Normal(0.9 * x, 1.0))
    pp.observe("y", dist.Normal(x, 1.0), ys[t])
    return x
prog = pp.sequential(lambda ys: init(), step, lambda ys: ys.shape[0])
r = pp.infer(prog, np.zeros(5, np.float32), algorithm=pp.SMC(64), key=0)
print("LOGZ", float(r.log_evidence))
"""


def run(env_extra, tmp_path):
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line[:3] in ("DIR", "LOG"))
    return lines["DIR"], float(lines["LOGZ"])


def test_cache_on_by_default_and_reused(tmp_path):
    folder = tmp_path / "cache"
    d1, z1 = run({"PPINFER_CACHE_DIR": str(folder), "PPINFER_COMPILATION_CACHE": "1"}, tmp_path)
    assert d1 == str(folder)
    entries = list(folder.iterdir())
    assert entries, "the first run wrote nothing to the cache"
    d2, z2 = run({"PPINFER_CACHE_DIR": str(folder), "PPINFER_COMPILATION_CACHE": "1"}, tmp_path)
    assert z2 == z1  # a loaded program computes the same numbers
    assert len(list(folder.iterdir())) == len(entries)  # nothing compiled anew


def test_cache_opt_out(tmp_path):
    folder = tmp_path / "cache"
    d, _ = run({"PPINFER_CACHE_DIR": str(folder), "PPINFER_COMPILATION_CACHE": "0"}, tmp_path)
    assert d == "None" and not folder.exists()


def test_a_cache_warning_during_the_dry_run_is_not_a_model_error():
    """Every compilation is cached, the eager dry run's small op programs included, so a process
    may read an entry another process is still writing: JAX warns and compiles again. The dry run
    turns NumPyro's UserWarnings into model errors, but not that one."""
    import warnings

    import numpyro.distributions as dist
    import pytest

    import ppinfer as pp

    def model():
        message = "Error reading persistent compilation cache entry for 'jit_add': EOFError: truncated"
        warnings.warn(message, UserWarning, stacklevel=1)
        pp.sample("x", dist.Normal(0.0, 1.0))

    with pytest.warns(UserWarning, match="persistent compilation cache"):
        r = pp.infer(model, algorithm=pp.Importance(10), key=0)
    assert np.isfinite(r.log_evidence)
