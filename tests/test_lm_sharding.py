"""Tensor-parallel LM: weights sharded over 4 forced CPU devices give the unsharded logits."""

import textwrap

import pytest
from conftest import run_on_forced_devices

import ppinfer as pp

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from ppinfer.lm import load_default, lm_step, prefill, init_particle_cache
    from ppinfer.lm.sharding import model_mesh, shard_params

    lm = load_default()
    mesh = model_mesh(4)
    sharded = shard_params(lm.params, lm.config, mesh)
    q = sharded["layers"]["q"]["w"]
    assert q.sharding.num_devices == 4 and q.addressable_shards[0].data.shape[-1] == q.shape[-1] // 4
    tokens = jnp.asarray(lm.tokenizer.encode("<|endoftext|>import os"), jnp.int32)

    def run(params):
        logits, prompt = jax.jit(prefill, static_argnums=1)(params, lm.config, tokens)
        cache = jax.tree.map(lambda x: x[0], init_particle_cache(lm.config, 1, 8))
        step = jax.jit(lm_step, static_argnums=1)
        outs = [logits]
        for t in lm.tokenizer.encode(" import sys"):
            out, cache = step(params, lm.config, prompt, cache, jnp.asarray(t, jnp.int32))
            outs.append(out[None])
        return np.concatenate([np.asarray(o) for o in outs])

    a, b = run(lm.params), run(sharded)
    err = float(np.max(np.abs(a - b)))
    assert err < 1e-5, err
    print("TP OK", err)
    """
)


def test_tensor_parallel_logits_match():
    assert "TP OK" in run_on_forced_devices(SCRIPT)


def test_indivisible_heads_are_a_config_error():
    from ppinfer.lm import load_default
    from ppinfer.lm.sharding import param_shardings

    lm = load_default()  # 4 heads cannot be split over 3 devices
    with pytest.raises(pp.ConfigError, match="num_heads"):
        param_shardings(lm.params, lm.config, _FakeMesh(3))


class _FakeMesh:
    def __init__(self, size):
        self.shape = {"model": size}


def test_a_mesh_without_the_axis_is_a_config_error():
    """A mesh whose axis has another name: a raw KeyError before."""
    import jax
    import numpy as np

    from ppinfer.lm import load_default
    from ppinfer.lm.sharding import shard_params

    lm = load_default()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("mdl",))
    with pytest.raises(pp.ConfigError, match=r"no axis 'model' \(its axes: \('mdl',\)\)"):
        shard_params(lm.params, lm.config, mesh)
