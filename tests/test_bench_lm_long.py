"""The pieces of benchmarks/bench_lm_long.py, run at tiny sizes so that the benchmark cannot rot
unnoticed (it once failed at its plain-sampling row after ``_generate`` took a set of EOS ids).

On the benchmark's random Llama-shaped model: an SMC run on each cache path writes T tokens per
particle with no ``e`` in any weighted particle's text and reports its resamplings (the paged one
its pool use); the plain
sampler returns N sequences; the decode-step timer returns a positive time per length; the bytes
a paged resampling copies are fewer than the dense cache's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_lm_long as bl  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    return bl.random_llama()


@pytest.mark.parametrize("cache", ["dense", "paged"])
def test_smc_rows_run_and_respect_the_constraint(lm, cache):
    n, t = 4, 40  # past one 32-position block: the paged run commits tails to the pool
    run, record = bl.make_smc(lm, cache, n, t, 0.9, 1.0)
    result = run(0)
    assert record["length"] == t and len(record["resampled"]) == 1
    weights = np.asarray(result.weights)
    tokens = np.asarray(result.state[0].tokens)
    texts = [lm.tokenizer.decode(row.tolist()) for row, w in zip(tokens, weights, strict=True) if w > 0]
    assert texts and all("e" not in text.lower() for text in texts)
    if cache == "paged":
        assert record["peak"] and record["peak"][0] > 0


def test_plain_row_and_step_timer_run(lm):
    tokens, lengths = bl.make_plain(lm, 3, 5)(0)
    assert tokens.shape[0] == 3 and np.asarray(lengths).max() <= 5
    ms = bl.decode_step_ms(lm, 2, (32, 64), reps=1)
    assert set(ms) == {32, 64} and all(v > 0 for v in ms.values())


def test_paged_resampling_copies_less_than_dense(lm):
    dense = bl.cache_shapes(lm, "dense", 8, 128, 1.0)
    paged = bl.cache_shapes(lm, "paged", 8, 128, 0.25)
    assert bl.resample_bytes(paged) < bl.resample_bytes(dense) == bl.kv_bytes(dense)
    assert bl.kv_bytes(paged) < bl.kv_bytes(dense)
