"""Saving, loading and resuming an IBIS posterior; clear errors for bad batches and bad files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import ppinfer as pp
from models.classic import beta_bernoulli
from ppinfer.errors import CheckpointError, ConfigError, DataError, ModelError, ZeroEvidenceError
from ppinfer.updates import IBIS, load, program_identity, save
from ppinfer.updates.store import _checksum

ROOT = Path(__file__).resolve().parents[1]
T, B = 6, 8
CFG = dict(num_particles=64, num_moves=2, ess_threshold=0.8)

# The worker runs the same stream as `stream()` below (the program comes from models.classic, so its
# identity is the same in both processes), saving after every batch, and kills itself with SIGKILL
# once `kill_after` batches are saved.
WORKER = f"""
import os, signal, sys
import numpy as np
import ppinfer as pp
from models.classic import beta_bernoulli
from ppinfer.updates import IBIS, save

path, kill_after = sys.argv[1], int(sys.argv[2])
flips = np.random.default_rng(11).binomial(1, 0.3, ({T}, {B})).astype(np.int32)
post = pp.infer(beta_bernoulli(2.0, 3.0), flips[0], algorithm=IBIS(**{CFG!r}), key=5)
save(post, path)
for batch in flips[1:]:
    post = post.update(batch)
    save(post, path)
    if post.step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
"""

FLIPS = np.random.default_rng(11).binomial(1, 0.3, (T, B)).astype(np.int32)
PROGRAM = beta_bernoulli(2.0, 3.0)  # one object: the compiled updates are cached per program


def stream(num_batches=T):
    post = pp.infer(PROGRAM, FLIPS[0], algorithm=IBIS(**CFG), key=5)
    for batch in FLIPS[1:num_batches]:
        post = post.update(batch)
    return post


def assert_identical(a, b):
    for x, y in zip(
        (a.ibis.particles, a.ibis.log_weights, a.ibis.key, a.log_evidence_history, a.ess, a.resampled),
        (b.ibis.particles, b.ibis.log_weights, b.ibis.key, b.log_evidence_history, b.ess, b.resampled),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.step == b.step and a.log_evidence == b.log_evidence


def test_resume_after_kill_is_bit_identical(tmp_path):
    # A worker process runs the stream, saving after every batch, and is killed by SIGKILL after
    # the 3rd; this process resumes from the file and must end bit-identical to the
    # uninterrupted stream.
    path = tmp_path / "posterior.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", WORKER, str(path), "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr
    resumed = load(path, PROGRAM)
    assert resumed.step == 3
    for batch in FLIPS[3:]:
        resumed = resumed.update(batch)
    assert_identical(resumed, stream())


def test_save_load_roundtrip_in_process(tmp_path):
    path = tmp_path / "p.safetensors"
    mid = stream(2)
    save(mid, path)
    resumed = load(path, PROGRAM)
    assert_identical(resumed, mid)
    for batch in FLIPS[2:]:
        resumed = resumed.update(batch)
    assert_identical(resumed, stream())


def test_load_errors(tmp_path):
    path = tmp_path / "p.safetensors"
    save(stream(2), path)
    with pytest.raises(CheckpointError, match="holds a posterior of program"):
        load(path, beta_bernoulli(1.0, 1.0))
    with pytest.raises(CheckpointError, match="settings"):
        load(path, beta_bernoulli(2.0, 3.0), IBIS(**{**CFG, "num_moves": 3}))
    with pytest.raises(CheckpointError, match="settings"):
        load(path, beta_bernoulli(2.0, 3.0), IBIS(**CFG, version="v2"))
    with pytest.raises(CheckpointError, match="no saved posterior"):
        load(tmp_path / "missing", beta_bernoulli(2.0, 3.0))
    raw = path.read_bytes()
    truncated = tmp_path / "truncated"
    truncated.write_bytes(raw[: len(raw) - 40])
    with pytest.raises(CheckpointError, match="not a readable"):
        load(truncated, beta_bernoulli(2.0, 3.0))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable"):
        load(garbage, beta_bernoulli(2.0, 3.0))
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # inside the last array's bytes
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        load(corrupt, beta_bernoulli(2.0, 3.0))


def test_file_without_tempering_settings_loads_as_plain_ibis(tmp_path):
    # Files written before adaptive tempering existed have no tempering settings: they ran plain IBIS.
    path = tmp_path / "p.safetensors"
    save(stream(2), path)
    with safe_open(str(path), framework="numpy") as f:
        header = json.loads(f.metadata()["ppinfer"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for k in ("tempering_ess", "max_stages"):
        del header["config"][k]
    del arrays["history/stages"]
    save_file(arrays, str(path), metadata={"ppinfer": json.dumps(header)})
    with pytest.raises(CheckpointError, match="checksum"):  # the checksum covers every array
        load(path, PROGRAM)
    header["checksum"] = _checksum(arrays, header)
    save_file(arrays, str(path), metadata={"ppinfer": json.dumps(header)})
    old = load(path, PROGRAM)
    assert old.config.tempering_ess is None and old.step == 2
    np.testing.assert_array_equal(old.extras["stages"], [1, 1])


def test_statistics_posterior_needs_its_algorithm_to_load(tmp_path):
    stats = lambda y: (jnp.float32(y.shape[0]), jnp.sum(y))

    def model(n, s):
        mu = pp.sample("mu", dist.Normal(0.0, 1.0))
        pp.factor("y", s * mu - 0.5 * n * mu**2)

    cfg = IBIS(num_particles=32, num_moves=1, sufficient_statistics=stats)
    post = pp.infer(model, np.ones(4, np.float32), algorithm=cfg, key=0)
    save(post, tmp_path / "s")
    with pytest.raises(CheckpointError, match="pass algorithm"):
        load(tmp_path / "s", model)
    again = load(tmp_path / "s", model, cfg).update(np.ones(4, np.float32))
    assert again.step == 2


def normal_model(y):
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    with pp.plate("data", y.shape[0]):
        pp.observe("y", dist.Normal(mu, 1.0), y)


def test_bad_batches_are_clear_errors():
    post = stream(2)
    with pytest.raises(DataError, match="NaN"):
        post.update(np.array([0.0, np.nan, 1.0, 2.0, 0, 0, 0, 0], np.float32))
    with pytest.raises(DataError, match="shapes"):
        post.update(np.zeros(B + 1, np.int32))
    with pytest.raises(DataError):
        post.update(np.full(B, 2, np.int32))  # outside the Bernoulli's support
    assert post.update(FLIPS[2]).step == 3  # the failed updates changed nothing
    # A first batch the program refuses is reported before the prior is drawn on it (an empty
    # batch was NumPyro's raw AssertionError from that draw).
    with pytest.raises(ModelError, match="running the program on the new batch failed.*plate"):
        pp.infer(beta_bernoulli(1.0, 1.0), np.zeros(0, np.int32), algorithm=IBIS(16), key=0)
    with pytest.raises(DataError, match="outside the support"):
        pp.infer(beta_bernoulli(1.0, 1.0), np.full(B, 2, np.int32), algorithm=IBIS(16), key=0)


def test_program_identity_is_stable_and_distinguishes_closures():
    assert program_identity(beta_bernoulli(2.0, 3.0)) == program_identity(beta_bernoulli(2.0, 3.0))
    assert program_identity(beta_bernoulli(2.0, 3.0)) != program_identity(beta_bernoulli(2.0, 4.0))
    assert program_identity(normal_model, "v1") != program_identity(normal_model, "v2")


SCALE = 1.0


def test_program_identity_sees_what_the_program_computes_with(tmp_path):
    # Only numbers, strings and arrays in closures counted: a model with a Laplace prior, a
    # distribution object or a dict in its closure, a module global or functools.partial arguments
    # that differ all had the same identity, so load() resumed another program's posterior silently.
    import functools

    global SCALE

    def uses(prior):
        def model(y):
            mu = pp.sample("mu", prior)
            pp.observe("y", dist.Normal(mu, 1.0), y)

        return model

    def with_settings(cfg):
        def model(y):
            mu = pp.sample("mu", dist.Normal(0.0, cfg["sd"]))
            pp.observe("y", dist.Normal(mu, 1.0), y)

        return model

    def normal(y):
        mu = pp.sample("mu", dist.Normal(0.0, 1.0))
        pp.observe("y", dist.Normal(mu, 1.0), y)

    def laplace(y):
        mu = pp.sample("mu", dist.Laplace(0.0, 1.0))
        pp.observe("y", dist.Normal(mu, 1.0), y)

    def scaled(y):
        mu = pp.sample("mu", dist.Normal(0.0, SCALE))
        pp.observe("y", dist.Normal(mu, 1.0), y)

    def keyword(y, sd):
        mu = pp.sample("mu", dist.Normal(0.0, sd))
        pp.observe("y", dist.Normal(mu, 1.0), y)

    laplace.__qualname__ = normal.__qualname__
    ident = program_identity
    assert ident(uses(dist.Normal(0.0, 1.0))) != ident(uses(dist.Normal(5.0, 100.0)))
    assert ident(uses(dist.Normal(0.0, 1.0))) == ident(uses(dist.Normal(0.0, 1.0)))
    assert ident(with_settings({"sd": 1.0})) != ident(with_settings({"sd": 100.0}))
    assert ident(normal) != ident(laplace)
    before = ident(scaled)
    SCALE = 100.0
    assert ident(scaled) != before
    SCALE = 1.0
    one, hundred = functools.partial(keyword, sd=1.0), functools.partial(keyword, sd=100.0)
    assert ident(one) != ident(hundred) and ident(one) == ident(functools.partial(keyword, sd=1.0))
    posterior = pp.infer(one, jnp.array([0.3, 1.2]), algorithm=IBIS(32, num_moves=1), key=0)
    save(posterior, tmp_path / "p.safetensors")
    with pytest.raises(pp.CheckpointError, match="holds a posterior of program"):
        load(tmp_path / "p.safetensors", hundred)
    assert load(tmp_path / "p.safetensors", one).step == posterior.step


def test_config_and_model_errors():
    with pytest.raises(ConfigError):
        IBIS(num_moves=0)
    with pytest.raises(ConfigError):
        IBIS(ess_threshold=1.5)
    with pytest.raises(ConfigError, match="tempering_ess"):
        IBIS(tempering_ess=1.0)
    with pytest.raises(ConfigError, match="max_stages"):
        IBIS(max_stages=0)
    with pytest.raises(ConfigError, match="static program"):
        pp.infer(pp.sequential(lambda: 0.0, lambda s, t: s, 2), algorithm=IBIS(8))

    def discrete(y):
        pp.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ModelError, match="discrete"):
        pp.infer(discrete, np.zeros(2, np.float32), algorithm=IBIS(8))


def test_impossible_batch_is_zero_evidence():
    def model(y):
        mu = pp.sample("mu", dist.Normal(0.0, 1.0))
        pp.condition("near", jnp.abs(mu - y) < 0.01)

    with pytest.raises(ZeroEvidenceError):
        pp.infer(model, np.float32(50.0), algorithm=IBIS(32, num_moves=1), key=0)


def test_resume_across_a_buffer_doubling(tmp_path):
    # 10 batches: the history buffer grows from 8 to 16 at batch 9; a posterior saved after batch 9
    # is rebuilt at capacity 16 and continues bit-identically.
    flips = np.random.default_rng(3).binomial(1, 0.3, (10, B)).astype(np.int32)
    post = pp.infer(PROGRAM, flips[0], algorithm=IBIS(**CFG), key=5)
    for batch in flips[1:9]:
        post = post.update(batch)
    save(post, tmp_path / "p")
    resumed = load(tmp_path / "p", PROGRAM)
    assert jax.tree.leaves(resumed.ibis.data)[0].shape[0] == 16
    assert_identical(resumed.update(flips[9]), post.update(flips[9]))


def test_a_posterior_of_dict_batches_saves_and_resumes_bit_identically(tmp_path):
    # Batches that are dicts of arrays (coverage: the saved data's dict structure was never written).
    def model(batch):
        p = pp.sample("p", dist.Beta(2.0, 3.0))
        with pp.plate("n", batch["flips"].shape[0]):
            pp.observe("y", dist.Bernoulli(p), batch["flips"])

    cfg = IBIS(**CFG)
    post = pp.infer(model, {"flips": FLIPS[0]}, algorithm=cfg, key=5).update({"flips": FLIPS[1]})
    save(post, tmp_path / "dict.safetensors")
    resumed = load(tmp_path / "dict.safetensors", model, cfg)
    assert_identical(post.update({"flips": FLIPS[2]}), resumed.update({"flips": FLIPS[2]}))
