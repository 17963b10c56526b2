"""Hostile and careless input: every case is a clear ppinfer error naming the problem, or a correct
answer (issue 17). Threads, infinite and underflowing weights, conditions, settings, data, saved
posteriors, malformed checkpoints, out-of-range token ids, enumeration budgets."""

from __future__ import annotations

import json
import math
import struct
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import ppinfer as pp
from ppinfer._compile import TRACE_LOCK
from ppinfer.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EnumerationError,
    ModelError,
    ZeroEvidenceError,
)
from ppinfer.lm import load as load_lm


def normal_model(y):
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    pp.observe("y", dist.Normal(mu, 1.0), y)


# ------------------------------------------------------------------------------ static arguments


@pytest.mark.parametrize("algorithm", [pp.Importance(1000), pp.SMC(1000)], ids=["importance", "smc"])
def test_static_arguments_that_compare_equal_but_differ_in_type_compile_apart(algorithm):
    """``True == 1`` and ``np.int64(3) == 3``: the compile cache keys a static argument by its type
    too, so a program that reads the type gets its own compiled code for each."""

    def model(k):
        z = pp.sample("z", dist.Normal(0.0, 1.0))
        shift = 5.0 if isinstance(k, bool) else float(isinstance(k, np.integer))
        pp.observe("y", dist.Normal(z + shift, 1.0), 0.0)  # posterior mean −shift/2

    program = model
    if isinstance(algorithm, pp.SMC):
        program = pp.sequential(lambda k: model(k), lambda x, t, k: x, 1)
    means = [
        float(pp.infer(program, k, algorithm=algorithm, key=0).mean("z")) for k in (True, 1, np.int64(1))
    ]
    assert means[0] < -2.0 and abs(means[1]) < 0.2 and -0.7 < means[2] < -0.3, means


# --------------------------------------------------------------------------------------- threads


def _programs():
    """Fresh program objects (so the first calls in the threads trace and compile concurrently)."""

    def static_a(y):
        mu = pp.sample("mu", dist.Normal(0.0, 1.0))
        pp.observe("y", dist.Normal(mu, 1.0), y)

    def static_b(y):
        s = pp.sample("s", dist.HalfNormal(1.0))
        z = pp.sample("z", dist.Normal(0.0, s))
        pp.observe("y", dist.Normal(z, 0.5), y)

    def init(y):
        return pp.sample("x0", dist.Normal(0.0, 1.0))

    def step(x, t, y):
        x = pp.sample("x", dist.Normal(0.9 * x, 1.0))
        pp.observe("obs", dist.Normal(x, 1.0), y)
        return x

    walk = pp.sequential(init, step, 3)
    return [
        (static_a, pp.Importance(16)),
        (static_b, pp.Importance(8)),
        (walk, pp.SMC(8)),
        (static_a, pp.Importance(32)),
        (walk, pp.SMC(8, history=False)),  # a pure filter: its phases are one compiled program
    ]


def _call(programs, i, j):
    program, algorithm = programs[(i + j) % len(programs)]
    r = pp.infer(program, 0.25 * j, algorithm=algorithm, key=7 * i + j)
    return float(r.log_evidence), {k: np.asarray(v) for k, v in r.samples.items()}


def test_threads_give_the_single_threaded_results():
    programs = _programs()
    threads, calls = 8, 20
    results, errors = {}, []
    barrier = threading.Barrier(threads)

    def worker(i):
        barrier.wait()
        for j in range(calls):
            try:
                results[i, j] = _call(programs, i, j)
            except Exception as e:  # noqa: BLE001 (collected and reported below)
                errors.append(f"{type(e).__name__}: {e}")

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []
    assert len(results) == threads * calls
    for (i, j), (log_z, samples) in results.items():
        ref_z, ref_samples = _call(programs, i, j)
        assert log_z == ref_z
        for k, v in ref_samples.items():
            np.testing.assert_array_equal(samples[k], v)


def test_threads_with_deferred_samples_and_updates_of_one_result():
    # Many threads reading the same lazily traced SMC samples get one computed value.
    programs = _programs()
    r = pp.infer(programs[2][0], 0.5, algorithm=pp.SMC(8), key=3)
    seen = []
    pool = [threading.Thread(target=lambda: seen.append(r.samples["x"])) for _ in range(6)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(seen) == 6 and all(s is seen[0] for s in seen)


def test_trace_lock_is_reentrant_and_can_be_set_aside():
    assert not TRACE_LOCK.held()
    with TRACE_LOCK, TRACE_LOCK:
        assert TRACE_LOCK.held()
        other = []
        with TRACE_LOCK.released():
            assert not TRACE_LOCK.held()

            def take():
                with TRACE_LOCK:  # another thread can take the lock meanwhile
                    other.append(TRACE_LOCK.held())

            t = threading.Thread(target=take)
            t.start()
            t.join(timeout=30)
        assert other == [True] and TRACE_LOCK.held()
    assert not TRACE_LOCK.held()


# ------------------------------------------------------------------------- infinite / tiny weights


@pytest.mark.parametrize("value", [jnp.inf, jnp.nan])
def test_infinite_or_nan_factor_is_a_model_error(value):
    def m():
        pp.sample("x", dist.Normal(0.0, 1.0))
        pp.factor("boom", value)

    with pytest.raises(ModelError, match=r"'boom'.*NaN or \+inf"):
        pp.infer(m, algorithm=pp.Importance(16))


def test_infinite_factor_only_for_some_particles_is_a_model_error():
    def m():
        x = pp.sample("x", dist.Normal(0.0, 1.0))
        pp.factor("tail", jnp.where(x > 3.5, jnp.inf, 0.0))

    with pytest.raises(ModelError, match="'tail'"):
        pp.infer(m, algorithm=pp.Importance(20_000), key=1)


def test_infinite_factor_in_a_sequential_step_is_a_model_error():
    def init():
        return jnp.zeros(())

    def step(x, t):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.factor("step_weight", jnp.where(t == 1, jnp.inf, 0.0))
        return x

    with pytest.raises(ModelError, match="'step_weight'"):
        pp.infer(pp.sequential(init, step, 3), algorithm=pp.SMC(8))


@pytest.mark.parametrize("value", [jnp.inf, jnp.nan])
@pytest.mark.parametrize("stops", [False, True])
def test_nan_or_infinite_site_for_a_few_particles_of_a_later_step_is_named(value, stops):
    # The step checks its sites only when the step's log-sum-exp is NaN or +inf (what a bad site
    # at a live particle makes it): a gate that missed +inf, or a particle, would let this run end.
    def init():
        return jnp.zeros(())

    def step(x, t):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.factor("tail", jnp.where((t == 3) & (x > 2.5), value, 0.0))
        if stops:
            pp.stop(t == 5)
        return x

    with pytest.raises(ModelError, match="'tail'"):
        pp.infer(pp.sequential(init, step, 6), algorithm=pp.SMC(4096), key=3)


def test_a_nan_site_is_named_even_when_a_selection_drops_the_nan_particle():
    # pp.infer runs SMC without per-step NaN flags and runs again with them when log Ẑ went NaN or
    # +inf at any step: here the user's selection turns the NaN weight into −inf, so the final log
    # Ẑ is finite and only the step's recorded log-sum-exp shows the NaN.
    from ppinfer.kernels.select import Systematic

    def drop_nan(u, log_weights):
        return Systematic()(u, jnp.where(jnp.isnan(log_weights), -jnp.inf, log_weights))

    def step(x, t):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.factor("tail", jnp.where((t == 2) & (x > 1.5), jnp.nan, 0.0))
        return x

    program = pp.sequential(lambda: jnp.zeros(()), step, 5)
    with pytest.raises(ModelError, match="'tail'"):
        pp.infer(program, algorithm=pp.SMC(256, resampling=drop_nan, ess_threshold=1.0), key=3)


def test_a_healthy_run_compiles_no_nan_flags():
    from ppinfer import _compile

    program = pp.sequential(lambda: jnp.zeros(()), lambda x, t: pp.sample("x", dist.Normal(x, 1.0)), 4)
    pp.infer(program, algorithm=pp.SMC(16), key=0)
    loops = [k[2] for k in _compile._CACHE if k[:2] == ("loop", program)]
    assert loops and not any(loop.nan_sites for loop in loops)


def test_minus_infinity_drops_the_particle():
    def m():
        x = pp.sample("x", dist.Normal(0.0, 1.0))
        pp.factor("positive", jnp.where(x > 0, 0.0, -jnp.inf))

    r = pp.infer(m, algorithm=pp.Importance(256), key=2)
    x = np.asarray(r.samples["x"])
    w = np.asarray(r.weights)
    assert r.log_evidence == pytest.approx(math.log(np.mean(x > 0)), rel=1e-5)
    assert np.all(w[x <= 0] == 0) and w.sum() == pytest.approx(1.0, rel=1e-5)
    assert float(r.mean("x")) == pytest.approx(x[x > 0].mean(), rel=1e-5)


def test_all_minus_infinity_is_zero_evidence():
    def m():
        pp.sample("x", dist.Normal(0.0, 1.0))
        pp.factor("never", -jnp.inf)

    with pytest.raises(ZeroEvidenceError, match="weight zero"):
        pp.infer(m, algorithm=pp.Importance(16))


@pytest.mark.parametrize("tiny", [-1e8, -1e30])
def test_weights_sum_to_one_when_every_log_weight_is_tiny(tiny):
    def m():
        pp.sample("x", dist.Normal(0.0, 1.0))
        pp.factor("f", tiny)

    r = pp.infer(m, algorithm=pp.Importance(64), key=4)
    x = np.asarray(r.samples["x"])
    assert float(r.weights.sum()) == pytest.approx(1.0, rel=1e-5)
    assert float(r.mean("x")) == pytest.approx(x.mean(), rel=1e-4, abs=1e-6)
    assert r.final_ess == pytest.approx(64.0, rel=1e-4)


def test_normalize_keeps_the_spread_of_tiny_log_weights():
    lw = jnp.array([-1e8, -1e8 + 8.0, -jnp.inf], jnp.float32)  # float32 spacing at 1e8 is 8
    w = np.asarray(jnp.exp(pp.normalize(lw)))
    np.testing.assert_allclose(w, [1 / (1 + math.e**8), math.e**8 / (1 + math.e**8), 0.0], rtol=1e-5)
    assert float(pp.ess(jnp.full((10,), -1e30, jnp.float32))) == pytest.approx(10.0, rel=1e-5)
    assert float(pp.ess(jnp.full((10,), -jnp.inf))) == 0.0


def test_resampling_tiny_equal_weights_keeps_every_particle():
    pop = pp.Population(jnp.arange(16.0), jnp.full((16,), -1e30, jnp.float32))
    new, ancestors = pp.resample(jax.random.PRNGKey(0), pop, "systematic")
    np.testing.assert_array_equal(np.asarray(ancestors), np.arange(16))


# --------------------------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    "predicate, what",
    [
        (lambda: True, "function"),
        (0.5, "float 0.5"),
        ("no", "str 'no'"),
        (1, "int 1"),
        (jnp.array([0.0, 1.0]), "dtype float32"),
    ],
)
def test_condition_needs_a_boolean(predicate, what):
    def m():
        pp.sample("x", dist.Bernoulli(0.5))
        pp.condition("c", predicate)

    with pytest.raises(ModelError, match=r"condition\('c'") as e:
        pp.infer(m, algorithm=pp.Importance(8))
    assert what in str(e.value) and "boolean" in str(e.value)


def test_condition_on_a_boolean_is_exact():
    def m():
        x = pp.sample("x", dist.Bernoulli(0.3))
        pp.condition("one", x == 1)
        pp.condition("always", True)

    r = pp.infer(m, algorithm=pp.Enumerate())
    assert r.log_evidence == pytest.approx(math.log(0.3), rel=1e-6)
    assert float(r.mean("x")) == pytest.approx(1.0)


@pytest.mark.parametrize("when", [jnp.array([True, False]), 1.0])
def test_stop_needs_a_scalar_boolean(when):
    def init():
        return jnp.zeros(())

    def step(x, t):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.stop(when)
        return x

    with pytest.raises(ModelError, match=r"stop\(when\)"):
        pp.infer(pp.sequential(init, step, 2), algorithm=pp.SMC(4))


# ---------------------------------------------------------------------------- settings, programs


@pytest.mark.parametrize("cls", [pp.SMC, pp.Importance, pp.Enumerate])
def test_algorithm_class_instead_of_instance(cls):
    with pytest.raises(ConfigError, match=f"not the class {cls.__name__}.*{cls.__name__}\\(\\.\\.\\.\\)"):
        pp.infer(normal_model, 0.5, algorithm=cls)


@pytest.mark.parametrize("kernel", [pp.NUTS(), pp.HMC(), pp.SingleSiteMH()])
def test_bare_mcmc_kernel_says_wrap_it_in_mcmc(kernel):
    name = type(kernel).__name__
    with pytest.raises(ConfigError, match=f"{name}\\(\\) is an MCMC kernel.*pp.MCMC\\({name}\\(\\)"):
        pp.infer(normal_model, 0.5, algorithm=kernel)


def test_string_algorithm_is_a_config_error():
    with pytest.raises(ConfigError, match="inference algorithm"):
        pp.infer(normal_model, 0.5, algorithm="smc")


def test_program_class_is_a_model_error():
    class Model:
        def __init__(self, y):
            pass

    with pytest.raises(ModelError, match="got the class Model"):
        pp.infer(Model, 0.5)


@pytest.mark.parametrize("steps", [2.5, True, "3", np.array([2, 3]), 0])
def test_num_steps_must_be_a_whole_number(steps):
    with pytest.raises(ModelError, match="num_steps"):
        pp.sequential(lambda: 0.0, lambda s, t: s, steps)


def test_num_steps_function_returning_a_fraction():
    def init(ys):
        return jnp.zeros(())

    def step(x, t, ys):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), ys[t])
        return x

    program = pp.sequential(init, step, lambda ys: len(ys) / 2)
    with pytest.raises(ModelError, match="num_steps.*2.5"):
        pp.infer(program, jnp.ones(5), algorithm=pp.SMC(4))


def test_keyword_arguments_are_passed_to_the_program():
    by_position = pp.infer(normal_model, 0.5, algorithm=pp.Importance(32), key=3)
    by_name = pp.infer(normal_model, y=0.5, algorithm=pp.Importance(32), key=3)
    assert by_name.log_evidence == by_position.log_evidence
    np.testing.assert_array_equal(by_name.samples["mu"], by_position.samples["mu"])


def test_keyword_arguments_mixed_with_positional_and_cached():
    from ppinfer import _compile

    def m(scale, y):
        mu = pp.sample("mu", dist.Normal(0.0, scale))
        pp.observe("y", dist.Normal(mu, 1.0), y)

    first = pp.infer(m, 2.0, y=1.0, algorithm=pp.Importance(32), key=1)
    size = len(_compile._CACHE)
    second = pp.infer(m, 2.0, y=-1.0, algorithm=pp.Importance(32), key=1)
    assert len(_compile._CACHE) == size  # the same compiled code, new data
    ref = pp.infer(m, 2.0, -1.0, algorithm=pp.Importance(32), key=1)
    assert second.log_evidence == ref.log_evidence != first.log_evidence


def test_keyword_arguments_reach_the_proposal():
    def q(y):
        pp.sample("mu", dist.Normal(y / 2, 1.0))

    by_position = pp.infer(normal_model, 0.8, algorithm=pp.Importance(32, proposal=q), key=2)
    by_name = pp.infer(normal_model, y=0.8, algorithm=pp.Importance(32, proposal=q), key=2)
    assert by_name.log_evidence == by_position.log_evidence


def test_keyword_arguments_to_a_sequential_program_are_refused():
    program = pp.sequential(lambda: 0.0, lambda s, t: s, 2)
    with pytest.raises(ConfigError, match=r"keyword arguments \['y'\].*sequential"):
        pp.infer(program, y=1.0)


# ----------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    "data, match",
    [
        (jnp.array([1.0 + 2.0j]), "complex dtype"),
        (1.0 + 2.0j, "complex number"),
        (np.array([1.0, "a"], dtype=object), "dtype object"),
        (np.array([1.0, np.nan]), "NaN"),
    ],
)
def test_unusable_data_is_a_data_error(data, match):
    with pytest.raises(DataError, match=f"argument \\[0\\].*{match}"):
        pp.infer(normal_model, data, algorithm=pp.Importance(8))


@pytest.mark.parametrize("kind", ["Series", "DataFrame"])
def test_pandas_data_says_to_pass_an_array(kind):
    pd = pytest.importorskip("pandas")
    data = pd.Series([1.0, 2.0]) if kind == "Series" else pd.DataFrame({"y": [1.0, 2.0]})
    with pytest.raises(DataError, match=f"pandas {kind}.*to_numpy"):
        pp.infer(normal_model, data, algorithm=pp.Importance(8))


def test_list_data_is_a_model_error_naming_the_list():
    with pytest.raises(ModelError, match="'y'.*list"):
        pp.infer(normal_model, [1.0, 2.0], algorithm=pp.Importance(8))


def _python_if():
    x = pp.sample("x", dist.Normal(0.0, 1.0))
    if x > 0:
        pp.factor("bonus", 1.0)


def _python_int():
    x = pp.sample("x", dist.Poisson(3.0))
    pp.factor("f", float(int(x)))


def _numpy_call():
    x = pp.sample("x", dist.Normal(0.0, 1.0))
    pp.factor("f", float(np.asarray(x)))


@pytest.mark.parametrize(
    "program, error",
    [
        (_python_if, "TracerBoolConversionError"),
        (_python_int, "ConcretizationTypeError"),
        (_numpy_call, "TracerArrayConversionError"),
    ],
)
def test_python_control_flow_on_a_sampled_value(program, error):
    with pytest.raises(ModelError, match="jnp.where") as e:
        pp.infer(program, algorithm=pp.Importance(8))
    message = str(e.value)
    assert error in message and "test_bad_input.py:" in message and program.__name__ in message


def test_python_if_in_a_sequential_step():
    def init():
        return jnp.zeros(())

    def step(x, t):
        x = pp.sample("x", dist.Normal(x, 1.0))
        return x + 1.0 if x > 0 else x

    with pytest.raises(ModelError, match="lax.cond"):
        pp.infer(pp.sequential(init, step, 2), algorithm=pp.SMC(4))


# ------------------------------------------------------------------------------ saved posteriors


@pytest.fixture(scope="module")
def posterior():
    from models.classic import beta_bernoulli

    flips = np.random.default_rng(3).binomial(1, 0.4, (3, 6)).astype(np.int32)
    post = pp.infer(
        beta_bernoulli(2.0, 3.0),
        flips[0],
        algorithm=pp.IBIS(num_particles=32, num_moves=1, ess_threshold=0.8),
        key=1,
    )
    return post.update(flips[1]), beta_bernoulli(2.0, 3.0)


def _rewrite(path, edit, recompute_checksum):
    from ppinfer.updates.store import _checksum

    with safe_open(str(path), framework="numpy") as f:
        header = json.loads(f.metadata()["ppinfer"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    edit(header, arrays)
    if recompute_checksum:
        header["checksum"] = _checksum(arrays, header)
    save_file(arrays, str(path), metadata={"ppinfer": json.dumps(header)})


def test_save_to_a_missing_folder(posterior, tmp_path):
    from ppinfer.updates import save

    with pytest.raises(CheckpointError, match="does not exist"):
        save(posterior[0], tmp_path / "no" / "such" / "p.safetensors")


def test_the_checksum_covers_the_metadata(posterior, tmp_path):
    from ppinfer.updates import load, save

    path = tmp_path / "p.safetensors"
    save(posterior[0], path)
    _rewrite(path, lambda h, a: h.update(step=1), recompute_checksum=False)
    with pytest.raises(CheckpointError, match="checksum"):
        load(path, posterior[1])


def test_an_edited_step_is_caught_even_with_a_recomputed_checksum(posterior, tmp_path):
    from ppinfer.updates import load, save

    path = tmp_path / "p.safetensors"
    save(posterior[0], path)
    _rewrite(path, lambda h, a: h.update(step=3), recompute_checksum=True)
    with pytest.raises(CheckpointError, match="step 3"):
        load(path, posterior[1])


@pytest.mark.parametrize("field", ["step", "config", "program", "data_structure"])
def test_a_missing_header_field_is_a_checkpoint_error(posterior, tmp_path, field):
    from ppinfer.updates import load, save

    path = tmp_path / "p.safetensors"
    save(posterior[0], path)
    _rewrite(path, lambda h, a: h.pop(field), recompute_checksum=True)
    with pytest.raises(CheckpointError, match=field):
        load(path, posterior[1])


def test_a_missing_config_key_is_a_checkpoint_error(posterior, tmp_path):
    from ppinfer.updates import load, save

    path = tmp_path / "p.safetensors"
    save(posterior[0], path)
    _rewrite(path, lambda h, a: h["config"].pop("num_particles"), recompute_checksum=True)
    with pytest.raises(CheckpointError, match="config keys missing \\['num_particles'\\]"):
        load(path, posterior[1])


def test_a_missing_array_is_a_checkpoint_error(posterior, tmp_path):
    from ppinfer.updates import load, save

    path = tmp_path / "p.safetensors"
    save(posterior[0], path)
    _rewrite(path, lambda h, a: a.pop("log_weights"), recompute_checksum=True)
    with pytest.raises(CheckpointError, match="log_weights"):
        load(path, posterior[1])


def test_signed_file_round_trips(posterior, tmp_path):
    from ppinfer.updates import load, save

    post, program = posterior
    path = tmp_path / "p.safetensors"
    save(post, path, key=b"secret")
    back = load(path, program, key=b"secret")
    np.testing.assert_array_equal(back.ibis.particles, post.ibis.particles)
    assert back.step == post.step == 2
    assert load(path, program).step == 2  # without a key the checksum is still checked


def test_signed_file_with_the_wrong_key(posterior, tmp_path):
    from ppinfer.updates import load, save

    path = tmp_path / "p.safetensors"
    save(posterior[0], path, key=b"secret")
    with pytest.raises(CheckpointError, match="signature does not verify"):
        load(path, posterior[1], key=b"guess")


def test_a_re_checksummed_forgery_fails_the_signature(posterior, tmp_path):
    from ppinfer.updates import load, save

    path = tmp_path / "p.safetensors"
    save(posterior[0], path, key=b"secret")

    def forge(header, arrays):
        arrays["particles"] = arrays["particles"] * 0 + 0.9

    _rewrite(path, forge, recompute_checksum=True)
    assert load(path, posterior[1]).step == 2  # the checksum alone cannot tell
    with pytest.raises(CheckpointError, match="signature"):
        load(path, posterior[1], key=b"secret")


def test_unsigned_file_is_refused_when_a_key_is_given(posterior, tmp_path):
    from ppinfer.updates import load, save

    path = tmp_path / "p.safetensors"
    save(posterior[0], path)
    with pytest.raises(CheckpointError, match="not signed"):
        load(path, posterior[1], key=b"secret")


@pytest.mark.parametrize("key", ["secret", b""])
def test_the_key_must_be_nonempty_bytes(posterior, tmp_path, key):
    from ppinfer.updates import save

    with pytest.raises(ConfigError, match="key must"):
        save(posterior[0], tmp_path / "p.safetensors", key=key)


def test_a_header_that_is_a_list(posterior, tmp_path):
    from ppinfer.updates import load

    path = tmp_path / "p.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(path), metadata={"ppinfer": "[1, 2]"})
    with pytest.raises(CheckpointError, match="malformed header"):
        load(path, posterior[1])


# ---------------------------------------------------------------------------------- checkpoints

V, D, P, L = 11, 8, 16, 1  # vocab, width, context, layers of the hand-built GPT-2


def _gpt2_tensors():
    rng = np.random.default_rng(0)
    shapes = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(L):
        for name, shape in {
            "ln_1.weight": (D,),
            "ln_1.bias": (D,),
            "ln_2.weight": (D,),
            "ln_2.bias": (D,),
            "attn.c_attn.weight": (D, 3 * D),
            "attn.c_attn.bias": (3 * D,),
            "attn.c_proj.weight": (D, D),
            "attn.c_proj.bias": (D,),
            "mlp.c_fc.weight": (D, 4 * D),
            "mlp.c_fc.bias": (4 * D,),
            "mlp.c_proj.weight": (4 * D, D),
            "mlp.c_proj.bias": (D,),
        }.items():
            shapes[f"h.{i}.{name}"] = shape
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _config(**changes):
    cfg = {"model_type": "gpt2", "vocab_size": V, "n_embd": D, "n_layer": L, "n_head": 2, "n_positions": P}
    cfg.update(changes)
    return cfg


def _write_raw(file, header, body: bytes):
    """A safetensors file with exactly this header (any JSON) and body."""
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _folder(tmp_path, config=None, edit_header=None, tensors=None):
    """A GPT-2 checkpoint folder; ``edit_header(header)`` may corrupt the safetensors header."""
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_config() if config is None else config))
    tensors = _gpt2_tensors() if tensors is None else tensors
    header, body, offset = {}, b"", 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        span = [offset, offset + len(raw)]
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": span}
        body += raw
        offset += len(raw)
    if edit_header is not None:
        header = edit_header(header)
    _write_raw(folder / "model.safetensors", header, body)
    return folder


def test_the_hand_built_checkpoint_loads(tmp_path):
    lm = load_lm(_folder(tmp_path))
    logits, _ = lm.prefill([1, 2, 3])
    assert logits.shape == (3, V) and bool(jnp.all(jnp.isfinite(logits)))


def _set(name, key, value):
    def edit(header):
        header[name][key] = value
        return header

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set("wte.weight", "data_offsets", [-4, 348]), "data_offsets must be two integers >= 0"),
        (_set("wte.weight", "data_offsets", ["0", "352"]), "data_offsets must be two integers >= 0"),
        (_set("wte.weight", "data_offsets", [352, 0]), "end before they start"),
        (_set("wte.weight", "data_offsets", [0]), "data_offsets"),
        (_set("wte.weight", "shape", [-11, -8]), "shape must be a list of integers >= 0"),
        (_set("wte.weight", "shape", [2**40, 2**40]), "byte size does not match"),
        (_set("wte.weight", "shape", "11x8"), "shape must be a list"),
        (_set("wte.weight", "dtype", "F128"), "unknown 'F128'"),
        (_set("wte.weight", "dtype", "I32"), "dtype int32; weights must be floating point"),
        (lambda h: [h], "must be a JSON object, got a list"),
        (lambda h: {**h, "wte.weight": 5}, "expected an object"),
    ],
)
def test_malformed_safetensors_header(tmp_path, edit, match):
    with pytest.raises(CheckpointError, match=match):
        load_lm(_folder(tmp_path, edit_header=edit))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"n_head": 0}, "n_head must be an integer >= 1, got 0"),
        ({"n_layer": 0}, "num_layers must be an integer >= 1, got 0"),
        ({"n_embd": 9, "n_head": 2}, "not a multiple of n_head"),
        ({"vocab_size": "11"}, "vocab_size must be an integer >= 1"),
        ({"n_positions": -1}, "max_position_embeddings must be an integer >= 1"),
    ],
)
def test_malformed_config(tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        load_lm(_folder(tmp_path, config=_config(**changes)))


def test_config_that_is_a_json_list(tmp_path):
    folder = _folder(tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object, got a list"):
        load_lm(folder)


@pytest.mark.parametrize("shard", ["../../x.safetensors", "/etc/passwd", "a/../../x", "C:\\x", 7, ""])
def test_shard_names_cannot_leave_the_folder(tmp_path, shard):
    folder = _folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": shard}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder|non-empty strings"):
        load_lm(folder)


# ------------------------------------------------------------------------ token ids and context


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return load_lm(_folder(tmp_path_factory.mktemp("lm")))


@pytest.mark.parametrize("ids, match", [([1, V], f"token id {V} is out of range"), ([-1, 2], "token id -1")])
def test_token_ids_out_of_range(tiny_lm, ids, match):
    with pytest.raises(DataError, match=match):
        tiny_lm.prefill(ids)


def test_prompt_longer_than_the_context(tiny_lm):
    with pytest.raises(DataError, match=f"{P + 1} tokens, more than the model's context of {P}"):
        tiny_lm.prefill([1] * (P + 1))


def test_generation_past_the_context(tiny_lm):
    with pytest.raises(ConfigError, match="max_new_tokens=10 exceeds the model's context"):
        tiny_lm.generate([1] * 8, max_new_tokens=10)
    _, cache = tiny_lm.prefill([1] * 8)
    with pytest.raises(ConfigError, match="lower max_new_tokens to at most 8"):
        tiny_lm.init_particle_cache(cache, 2, 9)
    assert tiny_lm.generate([1] * 8, max_new_tokens=8).tokens.shape == (1, 8)


def test_token_program_generating_past_the_context_is_refused(tiny_lm):
    from ppinfer import tokens as tk

    with pytest.raises(ConfigError, match="lower max_new_tokens to at most 12"):
        tk.prompt(tiny_lm, [1, 2, 3, 4], P)  # 4 + 16 tokens > 16 positions: refused before compiling
    # An LMPrompt made by hand with too many new tokens is still refused when the program is traced.
    fits = tk.prompt(tiny_lm, [1, 2, 3, 4], P - 4)
    p = tk.LMPrompt(fits.lm, fits.prompt_cache, fits.first_logp, P, fits.eos_ids)

    def init(p):
        return tk.Context.start(p)

    def step(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())
        return ctx.extend(p, tok)

    with pytest.raises(ConfigError, match="exceeds the model's context"):
        pp.infer(pp.sequential(init, step, P), p, algorithm=pp.SMC(2))


# ---------------------------------------------------------------------------------- enumeration


def test_enumerate_prunes_branches_of_weight_zero():
    def m():
        a = pp.sample("a", dist.Bernoulli(0.5))
        pp.condition("a_is_one", a == 1)
        with pp.plate("p", 4):
            pp.sample("x", dist.Bernoulli(0.5))

    r = pp.infer(m, algorithm=pp.Enumerate())
    assert r.num_particles == 16  # a = 0's 16 completions are never run
    assert r.log_evidence == pytest.approx(math.log(0.5), rel=1e-6)
    assert float(r.mean("a")) == 1.0


def test_enumerate_everything_pruned_is_zero_evidence():
    def m():
        pp.condition("never", False)
        pp.sample("x", dist.Bernoulli(0.5))

    with pytest.raises(ZeroEvidenceError, match="weight zero"):
        pp.infer(m, algorithm=pp.Enumerate())


def test_enumerate_time_budget():
    def m():
        for i in range(12):
            pp.sample(f"b{i}", dist.Bernoulli(0.5))

    with pytest.raises(EnumerationError, match="max_seconds=0.01"):
        pp.infer(m, algorithm=pp.Enumerate(max_seconds=0.01))


@pytest.mark.parametrize("settings", [{"max_seconds": 0}, {"max_seconds": "1"}, {"max_branches": 0}])
def test_enumerate_settings(settings):
    with pytest.raises(ConfigError, match=next(iter(settings))):
        pp.Enumerate(**settings)


@pytest.mark.parametrize("temperature", [-1.0, float("nan"), float("inf"), "hot"])
def test_generation_temperature(tiny_lm, temperature):
    with pytest.raises(ConfigError, match="temperature must be a finite number >= 0"):
        tiny_lm.generate([1, 2], max_new_tokens=2, temperature=temperature)


@pytest.mark.parametrize(
    "settings,name",
    [({"num_particles": 0}, "num_particles"), ({"num_particles": 2.5}, "num_particles"),
     ({"num_particles": [1]}, "num_particles"), ({"max_new_tokens": 0}, "max_new_tokens"),
     ({"max_new_tokens": "4"}, "max_new_tokens")],
)  # fmt: skip
def test_generation_sizes(tiny_lm, settings, name):
    # Before: 0 particles returned an empty generation, the others crashed inside JAX.
    with pytest.raises(ConfigError, match=f"{name} must be an integer >= 1"):
        tiny_lm.generate([1, 2], **{"max_new_tokens": 2, **settings})


# ------------------------------------------------------------------------------------- resources


def test_out_of_device_memory_is_an_inference_error():
    class Huge:
        name = "Huge"
        num_particles = 10**9

        def run(self, key, program, args):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4e9 bytes")

    with pytest.raises(pp.InferenceError, match="num_particles=1000000000 ran out of device memory"):
        pp.infer(normal_model, 0.5, algorithm=Huge())


def test_keyword_programs_keep_the_identity_of_their_program():
    from models.classic import beta_bernoulli
    from ppinfer.infer import _KeywordProgram
    from ppinfer.updates import program_identity

    a, b = beta_bernoulli(1.0, 1.0), beta_bernoulli(2.0, 3.0)  # same code, other closure values
    ident = lambda p: program_identity(_KeywordProgram(p, ("y",)))
    assert ident(a) == ident(beta_bernoulli(1.0, 1.0)) != ident(b)
    assert _KeywordProgram(a, ("y",)) == _KeywordProgram(a, ("y",)) != _KeywordProgram(a, ("x",))


# ---------------------------------------------------------- num_steps against the data (item 5)


def _walk(index):
    """A random walk observed at ``index(ys, t)``."""

    def init(ys):
        return jnp.zeros(())

    def step(x, t, ys):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), index(ys, t))
        return x

    return init, step


@pytest.mark.parametrize("algorithm", [pp.SMC(4), pp.Enumerate()], ids=["SMC", "Enumerate"])
def test_num_steps_longer_than_the_data(algorithm):
    init, step = _walk(lambda ys, t: ys[t])
    program = pp.sequential(init, step, 7)
    for _ in range(2):  # a refused program is checked again, not remembered as checked
        with pytest.raises(ModelError, match=r"num_steps=7 is longer than the data \(5 along that axis\)"):
            pp.infer(program, jnp.arange(5.0), algorithm=algorithm)


@pytest.mark.parametrize(
    "index, data, match",
    [
        (lambda ys, t: ys[:, t], jnp.zeros((3, 5)), "reads element 6 of an array axis 1 of length 5"),
        (lambda ys, t: ys[t + 1], jnp.zeros(7), "step t=6 .* reads element 7 of an array axis 0 of length 7"),
        (lambda ys, t: jax.jit(lambda a, i: a[i])(ys, t), jnp.zeros(5), "reads element 6 .* length 5"),
        (lambda ys, t: ys[ys.astype(jnp.int32)[t] + 9], jnp.zeros(7, jnp.int32), "reads element 9 of"),
        (lambda ys, t: ys[6 - t], jnp.zeros(5), "step t=0 .* reads element 6 of an array axis 0 of length 5"),
    ],
    ids=["column", "t+1", "jitted", "data-index", "reversed"],
)
def test_out_of_range_step_indices(index, data, match):
    from ppinfer._bounds import check_step_indices

    init, step = _walk(index)
    with pytest.raises(ModelError, match=match):
        check_step_indices(pp.sequential(init, step, 7), (data,))


def test_writing_past_the_end_of_a_state_buffer():
    from ppinfer._bounds import check_step_indices

    def step(buf, t, ys):
        return buf.at[t].set(pp.sample("x", dist.Normal(0.0, 1.0)))

    prog = pp.sequential(lambda ys: jnp.zeros(4), step, 6)
    match = r"writes element 5 of .* length 4.*num_steps=6 is longer than the array"
    with pytest.raises(ModelError, match=match):
        check_step_indices(prog, (jnp.zeros(6),))


@pytest.mark.parametrize(
    "index",
    [
        lambda ys, t: ys[t],  # num_steps == len(ys)
        lambda ys, t: jnp.where(t + 1 < 5, ys[jnp.minimum(t + 1, 4)], 0.0),  # clamped on purpose
        lambda ys, t: jnp.take(ys, t + 1, mode="clip"),  # an explicit mode
    ],
    ids=["exact", "clamped", "take-clip"],
)
def test_in_range_step_indices_pass_the_check(index):
    from ppinfer._bounds import check_step_indices

    init, step = _walk(index)
    check_step_indices(pp.sequential(init, step, 5), (jnp.arange(5.0),))


# ------------------------------------------------------------------ memory estimate (item 10)


def test_too_many_particles_are_refused_before_allocating(monkeypatch):
    import resource

    import ppinfer._compile as compile_mod

    monkeypatch.setattr(compile_mod, "available_memory", lambda: (2**30, "a test device"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(
        ConfigError,
        match=r"num_particles=100000000: the compiled run needs an estimated "
        r"[\d.]+ GiB .* only 1.0 GiB is available on a test device",
    ) as e:
        pp.infer(normal_model, 0.5, algorithm=pp.Importance(10**8))
    assert e.value.needed > 10**8 * 8  # at least the samples and log weights
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 10**6  # the run (> 2 GB) never allocated


def test_the_memory_check_lets_small_runs_through(monkeypatch):
    import ppinfer._compile as compile_mod

    monkeypatch.setattr(compile_mod, "available_memory", lambda: (2**30, "a test device"))
    r = pp.infer(normal_model, 0.5, algorithm=pp.Importance(1000))
    assert r.num_particles == 1000


# -------------------------------------------------------------- sampling temperature (item 10)


BAD_TEMPERATURES = [-1.0, 0.0, 0, float("nan"), float("inf"), "hot", True, np.array([1.0, 2.0])]


@pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
def test_next_token_temperature(temperature):
    from ppinfer import tokens as tk

    ctx = tk.Context(jnp.zeros(3, jnp.int32), jnp.zeros((), jnp.int32), None, jnp.log(jnp.ones(4) / 4))
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0"):
        ctx.next_token(temperature)
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0"):
        tk.masked_next_token(ctx, jnp.ones(4, bool), temperature)
    assert ctx.next_token(0.5).logits.shape == (4,)


@pytest.mark.parametrize("temperature", [-0.5, 0.0])
def test_constrained_program_temperature(tiny_lm, temperature):
    from ppinfer import constraints
    from ppinfer import tokens as tk

    p = tk.prompt(tiny_lm, [1, 2], 4)
    vocab = [bytes([97 + i]) for i in range(V)]
    with pytest.raises(ConfigError, match=f"temperature must be a finite number > 0, got {temperature}"):
        tk.constrained(p, constraints.Regex("a+"), temperature=temperature, vocab_bytes=vocab, eos_id=0)


# ----------------------------------------------------------------- batched enumeration (item 7)


def _hmm(k, t):
    from models.classic import discrete_hmm

    init = np.full(k, 1.0 / k)
    trans = np.full((k, k), 0.2 / k) + np.eye(k) * 0.8
    means = np.arange(k, dtype=float)
    ys = jnp.asarray(np.linspace(-0.5, k - 0.5, t), jnp.float32)
    return discrete_hmm(init, trans, means, 1.0), ys, (init, trans, means)


def test_batched_enumeration_is_exact_on_an_hmm():
    from scipy.stats import norm

    from semantics.exact import hmm_forward

    prog, ys, (init, trans, means) = _hmm(2, 8)
    r = pp.infer(prog, ys, algorithm=pp.Enumerate())
    assert r.extras["batched"] and r.num_particles == 2**8
    assert r.extras["executions"] == 2**9 - 1  # every level of the tree once
    exact = hmm_forward(init, trans, norm.logpdf(np.asarray(ys, np.float64)[:, None], means, 1.0))[0]
    assert r.log_evidence == pytest.approx(exact, abs=1e-4)


def test_batched_and_eager_enumeration_agree_and_prune_zero_probability_choices():
    def m():
        a = pp.sample("a", dist.Categorical(jnp.array([0.5, 0.0, 0.5])))  # a = 1 is impossible
        probs = jnp.where(a == 2, jnp.array([0.0, 1.0]), jnp.array([0.7, 0.3]))
        b = pp.sample("b", dist.Categorical(probs))  # b = 0 is impossible when a = 2
        pp.observe("y", dist.Normal(a + b, 1.0), 1.5)

    batched = pp.infer(m, algorithm=pp.Enumerate(batched=True))
    eager = pp.infer(m, algorithm=pp.Enumerate(batched=False))
    auto = pp.infer(m, algorithm=pp.Enumerate())  # 1 + 3 + 6 <= EAGER_NODES executions: eager
    assert not auto.extras["batched"] and auto.log_evidence == pytest.approx(eager.log_evidence)
    assert batched.extras["batched"] and not eager.extras["batched"]
    for r in (batched, eager):
        assert r.num_particles == 3  # (0,0), (0,1), (2,1): the zero-probability branches are never run
    np.testing.assert_allclose(np.asarray(batched.samples["a"]), np.asarray(eager.samples["a"]))
    np.testing.assert_allclose(batched.log_weights, eager.log_weights, rtol=1e-5)
    assert batched.log_evidence == pytest.approx(eager.log_evidence, rel=1e-6)


def test_enumeration_level_over_budget_is_refused_before_it_runs():
    prog, ys, _ = _hmm(3, 12)
    match = r"max_branches=1000 .* choice 7 of 12 .* 2187 partial executions"
    with pytest.raises(EnumerationError, match=match):
        pp.infer(prog, ys, algorithm=pp.Enumerate(max_branches=1000))


def test_python_control_flow_falls_back_to_eager_enumeration():
    def m():
        a = pp.sample("a", dist.Bernoulli(0.3))
        if int(a) == 1:  # Python control flow on a choice: not traceable as one batch
            pp.sample("b", dist.Bernoulli(0.5))

    r = pp.infer(m, algorithm=pp.Enumerate(batched=True))
    assert not r.extras["batched"] and r.num_particles == 3
    assert r.log_evidence == pytest.approx(0.0, abs=1e-6)


def test_enumerate_batched_setting():
    with pytest.raises(ConfigError, match="batched must be True, False or None"):
        pp.Enumerate(batched="yes")


# ------------------------------------------------------------- found by probing again (item 4)


@pytest.mark.parametrize("key", [2**64, -(2**63) - 1])
def test_seed_beyond_64_bits(key):
    with pytest.raises(ConfigError, match="an int seed must fit in 64 bits"):
        pp.infer(normal_model, 0.5, algorithm=pp.Importance(4), key=key)


@pytest.mark.parametrize("wide", [False, True])
def test_an_int_seed_is_jax_s_own_key(wide):
    # infer computes the threefry key of an int seed on the host: it must be PRNGKey's, bit for bit
    # (with and without x64, where JAX keeps only the low 32 bits), so a seed means the same run.
    from ppinfer.checks import as_key as _as_key

    with jax.enable_x64(wide):
        for seed in [0, 1, 7, 2**31, 2**32 - 1, 2**32, 2**40 + 5, 2**63 - 1, -1, -5, -(2**31) - 1, -(2**63)]:
            np.testing.assert_array_equal(np.asarray(_as_key(seed)), np.asarray(jax.random.PRNGKey(seed)))
        r1 = pp.infer(normal_model, 0.5, algorithm=pp.Importance(8), key=2**40 + 5)
        r2 = pp.infer(normal_model, 0.5, algorithm=pp.Importance(8), key=jax.random.PRNGKey(2**40 + 5))
        np.testing.assert_array_equal(np.asarray(r1.log_weights), np.asarray(r2.log_weights))


@pytest.mark.parametrize("cls", [pp.SMC, pp.Importance])
def test_num_particles_beyond_int32(cls):
    with pytest.raises(ConfigError, match=r"num_particles must be below 2\^31"):
        cls(2**32)


def test_result_of_a_missing_site_and_bad_sample_count():
    r = pp.infer(normal_model, 0.5, algorithm=pp.Importance(8))
    with pytest.raises(ConfigError, match=r"no site 'nope' in this result; its sites are \['mu'\]"):
        r.mean("nope")
    with pytest.raises(ConfigError, match="num_samples must be an integer >= 1, got -1"):
        r.sample(-1)


def test_save_something_that_is_not_a_posterior(tmp_path):
    from ppinfer.updates import save

    with pytest.raises(ConfigError, match=r"save\(\) takes the Posterior of an IBIS run .*, got str"):
        save("x", tmp_path / "p.safetensors")


def test_load_a_checkpoint_from_none():
    with pytest.raises(CheckpointError, match="load\\(\\) takes a checkpoint folder path, got NoneType"):
        load_lm(None)


@pytest.mark.parametrize("value", [-1e-5, 0.0, "x", float("nan")])
def test_malformed_norm_epsilon(tmp_path, value):
    with pytest.raises(CheckpointError, match="layer_norm_epsilon must be a finite number > 0"):
        load_lm(_folder(tmp_path, config=_config(layer_norm_epsilon=value)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_checkpoint_with_non_finite_weights(tmp_path, bad):
    tensors = _gpt2_tensors()
    tensors["h.0.mlp.c_fc.weight"][3, 2] = bad
    with pytest.raises(CheckpointError, match="'h.0.mlp.c_fc.weight' .* contains NaN or infinite values"):
        load_lm(_folder(tmp_path, tensors=tensors))


def test_an_invalid_parameter_is_a_model_error_under_every_particle_algorithm():
    # FFBS, SMC2 and PMMH traced the program before their dry run (or had none): a negative scale was
    # NumPyro's raw ValueError there, and a ModelError naming the step under SMC.
    ys = jnp.array([0.3, 1.1, 0.7])

    def prior(ys):
        pp.sample("a", dist.Uniform(-1.0, 1.0))

    def step(x, t, ys):
        x = pp.sample("x", dist.Normal(x, -1.0))
        pp.observe("y", dist.Normal(x, 0.5), ys[t])
        return x

    def step_theta(x, t, theta, ys):
        return step(theta["a"] * x, t, ys)

    plain = pp.sequential(lambda ys: jnp.zeros(()), step, lambda ys: ys.shape[0])
    with_theta = pp.sequential(lambda theta, ys: jnp.zeros(()), step_theta, lambda theta, ys: ys.shape[0])
    runs = [
        (plain, pp.FFBS(20, 4)),
        (with_theta, pp.SMC2(prior, 8, 8)),
        (with_theta, pp.PMMH(prior, 8, num_samples=4, num_warmup=1)),
    ]
    for program, algorithm in runs:
        with pytest.raises(ModelError, match="running step 0 once failed.*invalid scale"):
            pp.infer(program, ys, algorithm=algorithm, key=0)
    # A program without theta: num_steps(theta, ys) was a raw TypeError.
    theta_less = pp.sequential(lambda ys: jnp.zeros(()), step, lambda ys: ys.shape[0])
    for algorithm in (pp.SMC2(prior, 8, 8), pp.PMMH(prior, 8, num_samples=4, num_warmup=1)):
        with pytest.raises(ModelError, match="num_steps could not be called.*theta first"):
            pp.infer(theta_less, ys, algorithm=algorithm, key=0)


def test_token_ids_step_specs_and_constraint_settings_are_checked():
    # Each of these ran silently wrong (an out-of-range id clamped to the last row; an EOS outside the
    # vocabulary, so the solutions ran through the model's EOS; a 1.5-token chunk filling the context)
    # or failed with a raw Python/JAX error.
    import re

    from ppinfer import reasoning as rs
    from ppinfer import tokens as tk
    from ppinfer.constraints import Regex
    from ppinfer.lm import NGramLM

    probs = np.full((4, 4), 0.25)
    lm = NGramLM.from_probs(probs, bos_id=0, eos_id=0)
    for ids in ([9], [-1]):
        with pytest.raises(DataError, match=r"token ids must lie in \[0, 4\)"):
            lm.prefill(jnp.array(ids))
    with pytest.raises(ModelError, match="order n >= 2"):
        NGramLM.from_probs(np.full(3, 1 / 3))
    decode = lambda ids: "".join(map(str, ids))
    for fields, match in (
        ({"max_chunk": 1.5}, "max_chunk must be an integer >= 1"),
        ({"delimiters": "."}, "delimiters must be a non-empty tuple"),
        ({"delimiters": (-5,)}, r"delimiters\[0\] must be an integer >= 0"),
        ({"eos_id": 0.5}, "eos_id must be an integer >= 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            rs.StepSpec(decode=decode, **{"delimiters": (3,), "eos_id": 0, **fields})
    outside = rs.StepSpec(decode=decode, delimiters=(3,), eos_id=99)
    with pytest.raises(ConfigError, match=r"eos_id/delimiters \[99\] lie outside the vocabulary of 4"):
        rs.question_args(lm, outside, [0])
    spec = rs.StepSpec(decode=decode, delimiters=(3,), eos_id=0)
    with pytest.raises(ConfigError, match="pad_to needs an LM whose prefill takes a length"):
        rs.question_args(lm, spec, [0], pad_to=4)
    with pytest.raises(ConfigError, match="tau must be > 0"):
        rs.BeamSearch(4, tau=float("nan"))
    with pytest.raises(pp.ConstraintError, match="Regex flags must be re flags"):
        Regex("a", flags="i")
    assert Regex("a", flags=re.IGNORECASE).flags == re.IGNORECASE
    p = tk.prompt(lm, [0], 3)
    with pytest.raises(ConfigError, match="vocab_bytes must hold each token's bytes, got a str"):
        tk.constrained(p, Regex("a"), vocab_bytes=["a", "b", "c", "d"])


# ------------------------------------------------------------------ proposals that do not cover


def _normal_model(y):
    mu = pp.sample("mu", dist.Normal(0.0, 3.0))
    pp.observe("y", dist.Normal(mu, 1.0), y)


def test_a_discrete_proposal_or_guide_for_a_continuous_site_is_refused():
    coin = lambda y: pp.sample("mu", dist.Bernoulli(0.5))
    with pytest.raises(ModelError, match="'mu'.*discrete.*continuous"):
        pp.infer(_normal_model, 0.5, algorithm=pp.Importance(100, proposal=coin), key=0)
    import numpyro
    import optax

    def coin_guide(y):
        p = numpyro.param("p", 0.5, constraint=dist.constraints.unit_interval)
        pp.sample("mu", dist.Bernoulli(p))

    vi = pp.VI(pp.vi.elbo(4), coin_guide, optax.adam(0.1), num_steps=2)
    with pytest.raises(ModelError, match="guide's distribution at site 'mu'.*discrete"):
        pp.infer(_normal_model, 0.5, algorithm=vi, key=0)
    with pytest.raises(ConfigError, match="objective must be an Objective"):
        pp.VI("elbo", coin_guide, optax.adam(0.1), num_steps=2)

    def nan_guide(y):
        pp.sample("mu", dist.Normal(numpyro.param("m", jnp.nan), 1.0))

    vi = pp.VI(pp.vi.elbo(4), nan_guide, optax.adam(0.1), num_steps=2)
    with pytest.raises(ModelError, match=r"nan_guide once at its initial parameters \{'m': nan\}"):
        pp.infer(_normal_model, 0.5, algorithm=vi, key=0)


def test_a_proposal_that_misses_part_of_the_support_is_warned_about():
    """HalfNormal for a Normal site: importance sampling then targets the posterior restricted to
    μ > 0 (exact mean 0.45 unrestricted; the restricted one is ≈ 0.94), so it must say so."""
    half = lambda y: pp.sample("mu", dist.HalfNormal(3.0))
    with pytest.warns(pp.errors.ProposalSupportWarning, match="'mu'.*HalfNormal.*does not cover"):
        r = pp.infer(_normal_model, 0.5, algorithm=pp.Importance(4000, proposal=half), key=0)
    assert float(r.mean("mu")) > 0.8  # the restricted posterior, as the warning says
    full = lambda y: pp.sample("mu", dist.Normal(0.0, 3.0))  # covers: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", pp.errors.ProposalSupportWarning)
        r = pp.infer(_normal_model, 0.5, algorithm=pp.Importance(4000, proposal=full), key=0)
    assert abs(float(r.mean("mu")) - 0.45) < 0.05


# ------------------------------------------------------------------------------- impossible MCMC


def _impossible(y):
    mu = pp.sample("mu", dist.Normal(0.0, 3.0))
    with pp.plate("n", y.shape[0]):
        pp.observe("y", dist.Normal(mu, 1.0), y)


def _infinite_factor():
    z = pp.sample("z", dist.Normal(0.0, 1.0))
    pp.factor("f", jnp.where(z > 1, jnp.inf, 0.0))


@pytest.mark.parametrize("kernel", [pp.NUTS(), pp.SingleSiteMH()], ids=["nuts", "single-site-mh"])
def test_mcmc_refuses_an_impossible_posterior_and_an_infinite_density(kernel):
    """Data with +inf: every θ has likelihood 0, so there are no draws to return (Importance and
    SMC already raise ZeroEvidenceError); a +inf factor is no density at all."""
    alg = pp.MCMC(kernel, num_samples=100, num_warmup=100, num_chains=2, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pp.errors.PPInferWarning)
        with pytest.raises(pp.ZeroEvidenceError, match="every chain ended at a state of density zero"):
            pp.infer(_impossible, jnp.array([1.0, jnp.inf]), algorithm=alg, key=0)
        with pytest.raises(ModelError, match=r"\+inf or NaN"):
            pp.infer(_infinite_factor, algorithm=alg, key=0)
        r = pp.infer(_impossible, jnp.array([1.0, 2.0]), algorithm=alg, key=0)  # the same, possible
    assert abs(float(r.mean("mu")) - 1.5 * 18 / 19) < 0.4


def test_ibis_refuses_a_nan_likelihood_as_importance_and_smc_do():
    """log(x) is NaN for x < 0 (prior mass 0.16): IBIS used to drop those particles silently and
    return the posterior restricted to x > 0."""

    def model(y):
        x = pp.sample("x", dist.Normal(1.0, 1.0))
        pp.observe("y", dist.Normal(jnp.log(x), 1.0), y)

    for alg in (pp.IBIS(500), pp.Importance(500)):
        with pytest.raises(ModelError, match="NaN"):
            pp.infer(model, 0.2, algorithm=alg, key=0)


def _log_of_normal(y):
    x = pp.sample("x", dist.Normal(0.0, 1.0))
    # NaN loc where x < −2.6 (prior mass 0.005; the eager runs before the compiled one draw above it)
    pp.observe("y", dist.Normal(jnp.log(x + 2.6), 1.0), y)


@pytest.mark.parametrize("alg", [pp.TemperedSMC(2000), pp.WasteFreeSMC(2000)], ids=["tempered", "waste-free"])
def test_annealed_smc_refuses_a_nan_likelihood(alg):
    """The particles where the likelihood is NaN used to get weight zero silently: the result was
    the posterior restricted to x > 0."""
    with pytest.raises(ModelError, match=r"NaN or \+inf for some particles"):
        pp.infer(_log_of_normal, 0.2, algorithm=alg, key=1)


def test_an_improper_prior_is_a_model_error_outside_gradient_mcmc():
    def model(y):
        mu = pp.sample("mu", dist.ImproperUniform(dist.constraints.real, (), ()))
        pp.observe("y", dist.Normal(mu, 1.0), y)

    mh = pp.MCMC(pp.SingleSiteMH(), num_samples=10, num_warmup=10, progress_bar=False)
    for alg in (pp.Importance(10), pp.TemperedSMC(10), mh):
        with pytest.raises(ModelError, match="ImproperUniform"):
            pp.infer(model, 0.3, algorithm=alg, key=0)


def test_resample_move_refuses_a_program_that_fails_on_its_structure_run():
    def step(s, t, y):
        x = pp.sample("x", dist.Normal(1.0, 1.0))
        pp.observe("y", dist.Normal(jnp.sqrt(x), 1.0), y[t])  # NaN loc where x < 0
        return x

    prog = pp.sequential(lambda y: jnp.zeros(()), step, lambda y: y.shape[0])
    with pytest.raises(ModelError, match="invalid loc"):
        pp.infer(prog, jnp.array([0.5, 0.7]), algorithm=pp.ResampleMoveSMC(50, regenerate_suffix=1), key=0)


def test_enumerate_names_an_infinite_factor_as_a_model_error():
    """It said "every execution has zero weight", the opposite of a +inf factor."""

    def m(v):
        z = pp.sample("z", dist.Bernoulli(0.5))
        pp.factor("f", jnp.where(z == 1, v, 0.0))

    with pytest.raises(ModelError, match=r"1 of 2 executions have a NaN or \+inf log weight"):
        pp.infer(m, jnp.inf, algorithm=pp.Enumerate(), key=0)
    assert pp.infer(m, 0.0, algorithm=pp.Enumerate(), key=0).log_evidence == 0.0


# ---------------------------------------------------- settings and arguments found by a bug hunt


def _mcmc(kernel, **kw):
    return pp.MCMC(kernel, **({"num_samples": 10, "num_warmup": 10, "progress_bar": False} | kw))


BAD_SETTINGS = {
    "a batch of typed keys": (
        lambda: pp.infer(
            normal_model, 0.0, algorithm=pp.Importance(8), key=jax.random.split(jax.random.key(0), 3)
        ),
        "one jax.random key",
    ),
    "an rbg key": (
        lambda: pp.infer(normal_model, 0.0, algorithm=pp.Importance(8), key=jax.random.key(0, impl="rbg")),
        "threefry2x32",
    ),
    "devices=1.5": (lambda: pp.SMC(8, devices=1.5), "devices must be"),
    "devices=()": (lambda: pp.SMC(8, devices=()), "non-empty sequence of jax devices"),
    "devices=(1,)": (lambda: pp.SMC(8, devices=(1,)), "sequence of jax devices"),
    "move_sites=None": (lambda: pp.ResampleMoveSMC(8, move_sites=None), "move_sites must be"),
    "Steer N·K overflow": (lambda: pp.Steer(8, num_extensions=10**12), "num_extensions"),
    "FFBS num_paths overflow": (lambda: pp.FFBS(8, num_paths=10**12), "num_paths must be at most"),
    "temperatures=[]": (lambda: pp.TemperedSMC(8, temperatures=[]), "temperatures must increase"),
    "NUTS unknown option": (lambda: pp.NUTS(options={"a": 1}), r"\['a'\] are not numpyro.infer.NUTS options"),
    "MCMC num_samples overflow": (
        lambda: _mcmc(pp.NUTS(), num_samples=2**30, thinning=4),
        "transitions per chain",
    ),
    "RWMove covariance": (lambda: pp.TemperedSMC(8, move=_rw("dense")), "covariance must be"),
    "ess_threshold=True": (lambda: pp.SMC(8, ess_threshold=True), "ess_threshold must be a number"),
    "IBIS version=nan": (lambda: pp.IBIS(8, version=float("nan")), "version must be a string"),
    "history='3'": (lambda: pp.SMC(8, history="3"), "history must be True or False"),
    "dense_mass='3'": (lambda: pp.NUTS(dense_mass="3"), "dense_mass must be"),
    "NUTS step_size=inf": (lambda: pp.NUTS(step_size=float("inf")), "finite number > 0"),
    "false_failure_rate=0": (lambda: _check_evidence(0.0), "false_failure_rate must be in"),
}


def _check_evidence(rate):
    from semantics import check_unbiased_evidence

    return check_unbiased_evidence([0.0, 1.0], 0.0, false_failure_rate=rate)


def test_a_nan_keyword_argument_is_named():
    def model(y, scale):
        mu = pp.sample("mu", dist.Normal(0.0, 1.0))
        pp.observe("y", dist.Normal(mu, scale), y)

    with pytest.raises(DataError, match=r"argument \['scale'\] contains NaN"):  # was "argument [0]"
        pp.infer(model, y=jnp.ones(3), scale=float("nan"))


def test_a_posterior_refuses_updates_after_x64_is_switched():
    y = jnp.array([0.5, 1.0])
    post = pp.infer(_plated, y, algorithm=pp.IBIS(20), key=0)
    with jax.enable_x64(True):
        with pytest.raises(ConfigError, match="jax_enable_x64 was switched"):
            post.update(jnp.array([0.5, 1.0]))


def _plated(y):
    mu = pp.sample("mu", dist.Normal(0.0, 3.0))
    with pp.plate("n", y.shape[0]):
        pp.observe("y", dist.Normal(mu, 1.0), y)


def _rw(cov):
    from ppinfer.kernels.anneal import RWMove

    return RWMove(covariance=cov)


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_are_config_errors(case):
    """Each raised a raw TypeError/ValueError/OverflowError/AttributeError, or ran unbounded."""
    fn, match = BAD_SETTINGS[case]
    with pytest.raises(ConfigError, match=match):
        fn()


@pytest.mark.filterwarnings("ignore::ppinfer.errors.ConvergenceWarning")  # 10-draw chains
def test_site_names_and_nuts_options_are_taken_in_any_reasonable_form():
    assert pp.SingleSiteMH(sites=["mu"]).sites == ("mu",)  # a list: unhashable in a cache key before
    assert pp.SingleSiteMH(sites="mu").sites == ("mu",)  # one name, not the characters 'm', 'u'
    assert pp.Regenerate("mu").selection == ("mu",)
    assert pp.NUTS(options={"adapt_mass_matrix": False}).options == (("adapt_mass_matrix", False),)
    r = pp.infer(normal_model, 0.3, algorithm=_mcmc(pp.SingleSiteMH(sites=["mu"])), key=0)
    assert r.samples["mu"].shape == (40,)


@pytest.mark.filterwarnings("ignore::ppinfer.errors.ConvergenceWarning")  # 10-draw chains
def test_results_helpers_refuse_what_they_cannot_show():
    import matplotlib

    matplotlib.use("Agg")
    from ppinfer.plots import plot_ess

    def coin():
        pp.sample("z", dist.Bernoulli(0.3))

    with pytest.raises(ConfigError, match="no ESS per step"):
        plot_ess(pp.infer(coin, algorithm=pp.Enumerate(), key=0))
    r = pp.infer(normal_model, 0.3, algorithm=_mcmc(pp.NUTS()), key=0)
    assert r.to_arviz(num_chains=4).posterior["mu"].shape == (4, 10)  # Result.to_arviz's arguments
    with pytest.raises(ConfigError, match="its own 4 chains"):
        r.to_arviz(num_chains=2)


def test_enumerate_wraps_program_errors_and_event_dimensions():
    def raises():
        z = pp.sample("z", dist.Bernoulli(0.5))
        if int(z) == 0:
            raise ValueError("bad value")

    with pytest.raises(ModelError, match=r"choices \{'z': 0\}.*ValueError: bad value"):
        pp.infer(raises, algorithm=pp.Enumerate(batched=False), key=0)

    def event():
        pp.sample("z", dist.Bernoulli(jnp.array([0.2, 0.9])).to_event(1))

    with pytest.raises(EnumerationError, match="'z'.*cannot enumerate"):
        pp.infer(event, algorithm=pp.Enumerate(), key=0)


def test_vote_tokens_schema_and_store_inputs():
    from ppinfer import reasoning
    from ppinfer import tokens as tk
    from ppinfer.constraints import JSONSchema, Regex
    from ppinfer.lm import NGramLM

    with pytest.raises(DataError, match="NaN or \\+inf"):
        reasoning.weighted_vote([1, 2], [np.nan, 0.0])  # picked the NaN-vote answer
    with pytest.raises(ZeroEvidenceError, match="every vote is zero"):
        reasoning.weighted_vote([1, 2], [-np.inf, -np.inf])
    with pytest.raises(DataError, match="2 answers but 3 log votes"):
        reasoning.weighted_vote([1, 2], [0.0, 0.0, 0.0])
    with pytest.raises(pp.errors.ConstraintError, match="bounds must be whole numbers"):
        JSONSchema({"type": "number", "minimum": float("nan")}).compile([b"<eos>", b"1"], 0)
    lm = NGramLM.from_probs(np.full((4, 4), 0.25), bos_id=0, eos_id=0)
    with pytest.raises(ConfigError, match="key must be"):
        lm.generate("", key="a", max_new_tokens=2)
    p = tk.prompt(lm, [0], 3)
    vocab = [b"<eos>", b"a", b"b", b"c"]
    with pytest.raises(ConfigError, match="potentials must be"):
        tk.constrained(p, Regex("a+"), potentials=5, vocab_bytes=vocab, eos_id=0)
    with pytest.raises(ConfigError, match="constraint must be a ppinfer.constraints object"):
        tk.constrained(p, None, vocab_bytes=vocab, eos_id=0)
    with pytest.raises(CheckpointError, match="path of a saved posterior"):
        pp.updates.load(None, normal_model)


def test_a_twist_or_potential_of_the_wrong_shape_is_named():
    """A twist returning f[3] was reported as "step returned a state leaf of shape (3,)"."""
    from ppinfer import tokens as tk
    from ppinfer.constraints import Regex
    from ppinfer.lm import NGramLM

    lm = NGramLM.from_probs(np.full((4, 4), 0.25), bos_id=0, eos_id=0)
    p = tk.prompt(lm, [0], 3)
    vocab = [b"<eos>", b"a", b"b", b"c"]
    cases = {"the twist 'twist'": {"twist": lambda ctx: jnp.zeros(3)}}
    cases["potential 0"] = {"potentials": [lambda ctx, tok: jnp.zeros(2)]}
    for what, kw in cases.items():
        prog = tk.constrained(p, Regex("a+"), vocab_bytes=vocab, eos_id=0, **kw)
        with pytest.raises(ModelError, match=f"{what} must return one log .* per particle"):
            pp.infer(prog, algorithm=pp.SMC(4), key=0)


# ------------------------------------------------------------------------------ hunt 15


def test_nan_in_bfloat16_data_is_a_data_error():
    """NumPy calls bfloat16 kind "V": its NaN slipped past the data check into a ZeroEvidenceError
    that blamed the model."""
    y = jnp.array([float("nan"), 1.0], jnp.bfloat16)
    with pytest.raises(DataError, match=r"argument \[0\] contains NaN"):
        pp.infer(normal_model, y, algorithm=pp.Importance(10), key=0)
    ok = pp.infer(normal_model, jnp.array([0.5, 1.0], jnp.bfloat16), algorithm=pp.Importance(10), key=0)
    assert np.isfinite(ok.log_evidence)


def test_a_program_returning_a_non_array_is_a_model_error():
    def model(y):
        normal_model(y)
        return "done"

    with pytest.raises(ModelError, match="the program returned 'done' \\(str\\)"):
        pp.infer(model, jnp.array([0.1, 0.5]), algorithm=pp.Importance(10), key=0)


def test_num_steps_given_as_an_array_is_an_int():
    """``num_steps=jnp.array(3)`` was accepted, then failed to key the compile cache (unhashable)."""

    def step(x, t, ys):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.observe("y", dist.Normal(x, 0.5), ys[t])
        return x

    ys = jnp.array([0.3, 1.1, 0.7])
    init = lambda ys: jnp.zeros(())
    runs = [pp.sequential(init, step, n) for n in (jnp.array(3), np.int64(3), 3)]
    runs.append(pp.SequentialProgram(init, step, jnp.array(3)))
    assert all(type(p.num_steps) is int and p == runs[-1] for p in runs)
    z = {pp.infer(p, ys, algorithm=pp.SMC(20), key=0).log_evidence for p in runs}
    assert len(z) == 1 and np.isfinite(z.pop())
    with pytest.raises(ModelError, match="num_steps must be an int"):
        pp.sequential(init, step, jnp.array([3, 4]))


def test_algorithm_settings_checked_at_construction():
    """Each was accepted, then crashed inside JAX/MLIR or NumPyro (or was silently ignored)."""
    cases = {
        "num_moves must be at most": lambda: pp.IBIS(20, num_moves=10**20),
        "max_stages must be at most": lambda: pp.IBIS(20, max_stages=10**20),
        "sufficient_statistics must be None or a function": lambda: pp.IBIS(20, sufficient_statistics="sum"),
        "combine merges sufficient statistics": lambda: pp.IBIS(20, combine=lambda a, b: a),
        "init_strategy must be a NumPyro init strategy": lambda: pp.NUTS(init_strategy="median"),
        "init_strategy must be a NumPyro": lambda: pp.HMC(init_strategy="median"),
        r"Steer\(proposal=...\): a proposal is None or a program": lambda: pp.Steer(4, 2, proposal=3),
        r"SMC\(init_proposal=...\)": lambda: pp.SMC(4, init_proposal="q"),
        r"Importance\(proposal=...\)": lambda: pp.Importance(4, proposal=1.0),
    }
    for message, make in cases.items():
        with pytest.raises(ConfigError, match=message):
            make()
    import optax
    from numpyro.infer.autoguide import AutoNormal

    from ppinfer.vi import elbo

    with pytest.raises(ConfigError, match="init_params must be a dict"):
        pp.VI(elbo(), AutoNormal(normal_model), optax.adam(0.1), 2, init_params=0)


def test_expectation_of_a_non_array_is_a_config_error():
    r = pp.infer(normal_model, jnp.array([0.1, 0.5]), algorithm=pp.Importance(10), key=0)
    with pytest.raises(ConfigError, match="fn must return arrays"):
        r.expectation(lambda s: "mu")
    assert float(r.expectation(lambda s: 2 * s["mu"])) == pytest.approx(2 * float(r.mean("mu")), rel=1e-5)
