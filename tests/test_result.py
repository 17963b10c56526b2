import numpy as np
import pytest

import ppinfer as pp
from models.classic import lgssm, simulate_lgssm, sprinkler


@pytest.fixture(scope="module")
def result():
    ys = simulate_lgssm(0, 12, 0.9, 0.5, 1.0, 1.0)
    return pp.infer(lgssm(0.9, 0.5, 1.0, 1.0), ys, algorithm=pp.SMC(256), key=0)


def test_weights_and_ess(result):
    np.testing.assert_allclose(float(result.weights.sum()), 1.0, rtol=1e-5)
    assert 1.0 <= result.final_ess <= 256.0


def test_sample_and_resampled_samples(result):
    draws = result.sample(100, key=1)
    assert draws["x"].shape == (100, 12)
    eq = result.resampled_samples(key=1)
    assert eq["x"].shape == (256, 12)
    # Draws only come from particles with positive weight.
    pos = {
        tuple(np.asarray(v).round(5))
        for v, w in zip(result.samples["x"], result.weights, strict=True)
        if w > 0
    }
    assert all(tuple(np.asarray(v).round(5)) in pos for v in draws["x"][:10])


def test_mean_var_expectation(result):
    m = result.mean("x")
    assert m.shape == (12,)
    w = np.asarray(result.weights)
    np.testing.assert_allclose(m, (w[:, None] * np.asarray(result.samples["x"])).sum(0), rtol=1e-4, atol=1e-5)
    x = np.asarray(result.samples["x"], np.float64)
    mean = (w[:, None] * x).sum(0)
    np.testing.assert_allclose(result.var("x"), (w[:, None] * (x - mean) ** 2).sum(0), rtol=1e-4, atol=1e-6)
    e = result.expectation(lambda s: {"last": s["x"][-1], "sq": s["x"] ** 2})
    np.testing.assert_allclose(e["last"], m[-1], rtol=1e-5)


def test_to_arviz(result):
    # ESS-sized equally weighted draws in 4 groups (see Result.to_arviz; tests/test_runs_talk.py).
    idata = result.to_arviz()
    m = max(16, int(round(result.final_ess))) // 4 * 4
    assert idata.posterior["x"].shape[:2] == (4, m // 4)
    assert idata.attrs["log_evidence"] == pytest.approx(result.log_evidence)


def test_repr_is_readable(result):
    text = repr(result)
    assert "SMC" in text and "log_evidence" in text and "resampled" in text
    text = repr(pp.infer(sprinkler(), algorithm=pp.Enumerate()))
    assert "rain: mean=" in text


def test_deferred_extras_read_by_many_threads_and_printed():
    """``Result.extras`` computes its deferred entries once; threads reading an entry at the same
    moment all get it (before: a thread could find the entry neither deferred nor filled yet and get
    ``None`` from ``get`` or a ``KeyError``), and ``repr``/``==`` see the deferred entries."""
    import threading
    import time

    from ppinfer.result import Deferred, DeferredExtras

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)
        return 2

    for read in (lambda d: d.get("b"), lambda d: d["b"]):
        extras = DeferredExtras({"a": 1}, {"b": Deferred(slow), "c": Deferred(lambda: 3)})
        barrier, seen, errors = threading.Barrier(8), [], []

        def worker(extras=extras, barrier=barrier, seen=seen, errors=errors, read=read):
            barrier.wait()
            try:
                seen.append(read(extras))
            except Exception as e:  # noqa: BLE001 (collected and reported below)
                errors.append(repr(e))

        pool = [threading.Thread(target=worker) for _ in range(8)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert errors == [] and seen == [2] * 8
    assert len(calls) == 2  # once per DeferredExtras
    extras = DeferredExtras({"a": 1}, {"b": Deferred(lambda: 2)})
    assert repr(extras) == "{'a': 1, 'b': 2}"
    extras = DeferredExtras({"a": 1}, {"b": Deferred(lambda: 2)})
    assert extras == {"a": 1, "b": 2} and len(extras) == 2 and "b" in extras
    with pytest.raises(KeyError):
        extras["missing"]


def test_numpy_integer_keys_and_explicit_num_draws(result):
    # A NumPy integer seed (what infer accepts) was a raw JAX "invalid PRNG key" error here.
    for seed in (np.int64(1), np.uint32(1)):
        assert np.array_equal(result.sample(5, key=seed)["x"], result.sample(5, key=1)["x"])
        assert np.array_equal(result.resampled_samples(key=seed)["x"], result.resampled_samples(key=1)["x"])
        assert result.to_arviz(key=seed).posterior["x"].shape == result.to_arviz(key=1).posterior["x"].shape
    with pytest.raises(pp.ConfigError, match="key must be an int seed"):
        result.sample(5, key="1")
    # num_draws draws, as the docstring says; 7 in 4 groups returned 4 without a word.
    assert result.to_arviz(num_draws=8, num_chains=4).posterior["x"].shape[:2] == (4, 2)
    with pytest.raises(pp.ConfigError, match="num_draws=7 must be a multiple of num_chains=4"):
        result.to_arviz(num_draws=7, num_chains=4)
