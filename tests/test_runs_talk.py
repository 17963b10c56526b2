"""Runs that talk and results that show (issue 18; issue 17 item 9): the compile notice, progress
bars that never change the random stream, Ctrl-C between compiled chunks, NUTS diagnostics and
divergence warnings, ``to_arviz`` of weighted results, and ``Result.filtering``."""

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import ppinfer as pp
from ppinfer import _talk
from ppinfer.algorithms import smc as smc_algorithm
from ppinfer.errors import ConfigError, DivergenceWarning
from ppinfer.mcmc import MCMC, NUTS, SingleSiteMH
from ppinfer.mcmc import algorithm as mcmc_algorithm
from ppinfer.vi import elbo

ROOT = Path(__file__).resolve().parents[1]
Y = np.random.default_rng(2).normal(0.7, 1.0, 10).astype(np.float32)


def conjugate(y):
    mu = pp.sample("mu", dist.Normal(0.0, 2.0))
    pp.observe("y", dist.Normal(mu, 1.0), y)


@pytest.fixture
def default_verbosity():
    yield
    _talk._VERBOSITY = None


def fresh_program():
    """A sequential program no earlier test compiled (a new function object: a compile-cache miss)."""

    def step(x, t, ys):
        x = pp.sample("x", dist.Normal(0.5 * x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), ys[t])
        return x

    return pp.sequential(lambda ys: 0.0, step, lambda ys: ys.shape[0])


def test_compile_notice_on_stderr_and_in_the_log(capsys, caplog, monkeypatch, default_verbosity):
    monkeypatch.setattr(_talk, "NOTICE_AFTER_S", 0.0)  # announce every compilation
    ys = np.zeros(4, np.float32)
    program = fresh_program()
    pp.infer(program, ys, algorithm=pp.SMC(16), key=0)
    err = capsys.readouterr().err
    assert "ppinfer: compiled the SMC loop of `step` in" in err and "XLA" in err
    # A second call with the same shapes compiles nothing: no notice.
    pp.infer(program, ys + 1, algorithm=pp.SMC(16), key=1)
    assert "compiled" not in capsys.readouterr().err
    # Quiet: the log only.
    pp.set_verbosity(0)
    with caplog.at_level(logging.INFO, logger="ppinfer"):
        pp.infer(fresh_program(), ys, algorithm=pp.SMC(16), key=0)
    assert "ppinfer: compiled" not in capsys.readouterr().err
    assert any("compiled the SMC loop" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="set_verbosity"):
        pp.set_verbosity(3)


def mh_draws(**cfg):
    r = pp.infer(conjugate, Y, key=3, algorithm=MCMC(SingleSiteMH(), 40, 9, 3, thinning=2, **cfg))
    return np.asarray(r.chains()["mu"]), jax.tree.map(np.asarray, r.extras["info"])


def test_mcmc_draws_do_not_depend_on_chunks_or_progress_bar(monkeypatch, capsys):
    one_chunk, info_a = mh_draws(progress_bar=False)  # a chunk of 8, then the other 81 at once
    monkeypatch.setattr(mcmc_algorithm, "FIRST_CHUNK", 1)
    monkeypatch.setattr(_talk, "CHUNK_SECONDS", 0.0)  # one transition per chunk
    many_chunks, info_b = mh_draws(progress_bar=True)
    assert "3 chains" in capsys.readouterr().err  # the bar was drawn
    np.testing.assert_array_equal(one_chunk, many_chunks)
    jax.tree.map(np.testing.assert_array_equal, info_a, info_b)
    assert one_chunk.shape == (3, 40)


def interrupting_bar(after: int):
    """A ``progress_bar`` stand-in whose ``after``-th update raises ``KeyboardInterrupt`` (as Ctrl-C
    between two chunks would): ``(context manager, its Bar class counting the updates)``."""

    class Bar:
        updates = 0

        def update(self, n):
            Bar.updates += 1
            if Bar.updates == after:
                raise KeyboardInterrupt

    @contextmanager
    def bar(*_):
        yield Bar()

    return bar, Bar


def test_interrupted_run_leaves_no_trace(monkeypatch):
    """A KeyboardInterrupt between chunks propagates, and the next run with the same key gives the
    draws of an uninterrupted run (nothing half-written is cached)."""
    reference, _ = mh_draws()
    monkeypatch.setattr(mcmc_algorithm, "FIRST_CHUNK", 2)
    monkeypatch.setattr(_talk, "CHUNK_SECONDS", 0.0)

    bar, Bar = interrupting_bar(after=5)
    with monkeypatch.context() as m:
        m.setattr(mcmc_algorithm, "progress_bar", bar)
        with pytest.raises(KeyboardInterrupt):
            mh_draws()
    assert Bar.updates == 5
    again, _ = mh_draws()
    np.testing.assert_array_equal(again, reference)


CTRL_C = textwrap.dedent(
    """
    import signal, sys, time
    # As in a terminal: a process started in the background by a shell without job control (a CI
    # script, `cmd &`) inherits SIGINT ignored, and this test may run in one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import numpy as np, numpyro.distributions as dist, ppinfer as pp
    from ppinfer import _talk
    from ppinfer.mcmc import MCMC, SingleSiteMH
    _talk.NOTICE_AFTER_S = 0.0  # print the compile notice: the parent waits for it

    def conjugate(y):
        mu = pp.sample("mu", dist.Normal(0.0, 2.0))
        pp.observe("y", dist.Normal(mu, 1.0), y)

    def step(x, t, ys):
        x = pp.sample("x", dist.Normal(0.5 * x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), ys[t % 10])
        return x

    y = np.zeros(10, np.float32)
    try:
        if sys.argv[1] == "mcmc":  # 4 x 5 million transitions: minutes of work
            pp.infer(conjugate, y, algorithm=MCMC(SingleSiteMH(), 50_000, 0, 4, thinning=100), key=0)
        else:  # 3 million steps of 1,000 particles: minutes of work
            walk = pp.sequential(lambda ys: 0.0, step, 3_000_000)
            pp.infer(walk, y, algorithm=pp.SMC(1000, history=False), key=0)
    except KeyboardInterrupt:
        print("CAUGHT", time.time(), flush=True)
        raise
    print("FINISHED", flush=True)
    """
)


@pytest.mark.parametrize("algorithm", ["mcmc", "smc"])
def test_ctrl_c_stops_a_long_run_promptly(algorithm):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the persistent cache as configured
    child = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, algorithm], env=env, cwd=ROOT, stderr=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = []
        for line in child.stderr:  # the compile notice ends when the first chunk starts
            lines.append(line)
            if "ppinfer: compiled" in line:
                break
        else:
            pytest.fail("the child ended before compiling: " + "".join(lines)[-2000:])
        time.sleep(1.0)
        sent = time.time()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
        exited = time.time() - sent
    finally:
        child.kill()
        child.wait()
    assert "FINISHED" not in out
    assert "KeyboardInterrupt" in err and child.returncode != 0, err[-2000:]
    # The interrupt reaches Python between chunks (~0.25 s each, timed on the previous chunk: a
    # chunk can take a few times longer when the machine's load changes); the process then exits
    # (the interpreter's teardown takes seconds more on a loaded machine). Uninterrupted, either
    # run lasts minutes.
    caught = float(next(line for line in out.splitlines() if line.startswith("CAUGHT")).split()[1])
    assert caught - sent < 5.0, f"the run took {caught - sent:.1f} s to stop after Ctrl-C"
    assert exited < 20.0


def walk_until_zero(ys):
    """A random walk on {0, …, 4} observed with noise, stopping at 0: a program that can stop
    (finished-particle masks, and the loop ends early when every particle has stopped)."""

    def step(x, t, ys):
        move = pp.sample("move", dist.Categorical(probs=np.array([0.8, 0.1, 0.1], np.float32)))
        x = jnp.clip(x + move - 1, 0, 4)
        pp.observe("y", dist.Normal(x.astype(jnp.float32), 1.0), ys[t])
        pp.stop(x == 0)
        return x

    return pp.sequential(lambda ys: jnp.int32(2), step, lambda ys: ys.shape[0])


YS = np.random.default_rng(4).normal(1.5, 1.0, 40).astype(np.float32)
SMC_CONFIGS = {
    "smc": (fresh_program, pp.SMC(32)),
    "filter": (fresh_program, pp.SMC(32, history=False, ess_threshold=0.9)),
    "stopping": (lambda: walk_until_zero(YS), pp.SMC(32)),
    "stopping-filter": (lambda: walk_until_zero(YS), pp.SMC(32, history=False)),
    "steer": (fresh_program, pp.Steer(8, 3)),
}


def arrays_of(r) -> dict:
    """A result's arrays (samples, weights, histories, ancestors) as numpy."""
    out = {"log_weights": r.log_weights, "ess": r.ess, "history": r.log_evidence_history}
    out.update({f"samples/{k}": v for k, v in r.samples.items()})
    if r.ancestors is not None:
        out["ancestors"] = r.ancestors
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("name", list(SMC_CONFIGS))
def test_smc_chunks_and_progress_bar_do_not_change_the_result(name, monkeypatch, capsys):
    """The run wrapper drives the loop in compiled chunks; one step per chunk (and a bar) gives the
    arrays of the default chunking and of the pure loop compiled whole (``run_loop`` under jit)."""
    make, cfg = SMC_CONFIGS[name]
    program = make()
    default = pp.infer(program, YS, algorithm=cfg, key=5)
    monkeypatch.setattr(_talk, "FIRST_CHUNK", 1)
    monkeypatch.setattr(_talk, "CHUNK_SECONDS", 0.0)  # one step per chunk
    chunked = pp.infer(program, YS, algorithm=dataclasses.replace(cfg, progress_bar=True), key=5)
    assert f"{cfg.name} {cfg.num_particles} particles" in capsys.readouterr().err  # the bar was drawn
    a, b = arrays_of(default), arrays_of(chunked)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert default.log_evidence == chunked.log_evidence
    whole = jax.jit(lambda key, ys: smc_algorithm.run_loop(key, program, (ys,), cfg.loop(program, (ys,))))
    out = whole(jax.random.PRNGKey(5), YS)
    np.testing.assert_array_equal(np.asarray(out["log_weights"]), a["log_weights"])
    assert float(out["log_evidence"]) == default.log_evidence
    if name == "stopping":  # every particle stopped early: the loop's early exit ran
        assert not np.asarray(default.extras["active"])[:, -5:].any()


def test_interrupted_smc_run_leaves_no_trace(monkeypatch):
    program = fresh_program()
    cfg = pp.SMC(32, progress_bar=True)
    reference = pp.infer(program, YS, algorithm=cfg, key=1)
    monkeypatch.setattr(_talk, "FIRST_CHUNK", 2)
    monkeypatch.setattr(_talk, "CHUNK_SECONDS", 0.0)

    bar, Bar = interrupting_bar(after=5)
    with monkeypatch.context() as m:
        m.setattr(_talk, "progress_bar", bar)
        with pytest.raises(KeyboardInterrupt):
            pp.infer(program, YS, algorithm=cfg, key=1)
    assert Bar.updates == 5
    again = pp.infer(program, YS, algorithm=cfg, key=1)
    np.testing.assert_array_equal(np.asarray(again.log_weights), np.asarray(reference.log_weights))
    np.testing.assert_array_equal(np.asarray(again.samples["x"]), np.asarray(reference.samples["x"]))


Y8 = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], np.float32)
SIGMA8 = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], np.float32)


def eight_schools_centred(y, sigma):
    mu = pp.sample("mu", dist.Normal(0.0, 5.0))
    tau = pp.sample("tau", dist.HalfCauchy(5.0))
    with pp.plate("J", 8):
        theta = pp.sample("theta", dist.Normal(mu, tau))
        pp.observe("y", dist.Normal(theta, sigma), y)


def test_nuts_reports_the_divergences_of_centred_eight_schools():
    algorithm = MCMC(NUTS(), num_samples=300, num_warmup=300)  # 4 chains by default
    with pytest.warns(DivergenceWarning, match="diverged") as caught:
        r = pp.infer(eight_schools_centred, Y8, SIGMA8, algorithm=algorithm, key=0)
    stats = r.sample_stats()
    names = {"diverging", "tree_depth", "step_size", "acceptance_rate", "energy", "n_steps", "lp"}
    assert set(stats) == names and all(v.shape == (4, 300) for v in stats.values())
    n_div = int(stats["diverging"].sum())
    message = next(str(w.message) for w in caught if issubclass(w.category, DivergenceWarning))
    assert n_div > 0 and r.num_divergences == n_div and f" {n_div} of 1200 " in message
    steps = stats["n_steps"]
    assert np.all((2 ** (stats["tree_depth"] - 1) <= steps) & (steps < 2 ** stats["tree_depth"]))
    assert np.all((stats["acceptance_rate"] >= 0) & (stats["acceptance_rate"] <= 1))
    assert np.all(stats["step_size"] > 0)
    idata = r.to_arviz()
    assert set(idata.sample_stats.data_vars) == names
    assert int(idata.sample_stats["diverging"].sum()) == n_div
    assert np.isfinite(float(az.rhat(idata)["mu"]))  # 4 chains: R-hat is defined
    assert f"divergences={n_div}" in repr(r) and "tree_depth" in repr(r)
    # wall_time times the run, not its dispatch.
    t0 = time.perf_counter()
    with pytest.warns(DivergenceWarning):
        again = pp.infer(eight_schools_centred, Y8, SIGMA8, algorithm=algorithm, key=1)
    elapsed = time.perf_counter() - t0
    assert 0.5 * elapsed < again.wall_time <= elapsed


def test_vi_progress_and_chunking_do_not_change_the_fit(monkeypatch, capsys):
    def guide(y):
        m = numpyro.param("m", 0.0)
        pp.sample("mu", dist.Normal(m, 0.5))

    def fit(**kw):
        alg = pp.VI(elbo(4), guide, optax.adam(0.05), num_steps=30, num_particles=8, **kw)
        r = pp.infer(conjugate, Y, algorithm=alg, key=0)
        return np.asarray(r.extras["objective_trace"]), float(r.extras["params"]["m"])

    a = fit(progress_bar=False, chunk_size=8)  # chunks of 8 (the same compiled loop as below)

    monkeypatch.setattr(_talk, "CHUNK_SECONDS", 0.0)  # 1 step per chunk after the first 8
    b = fit(progress_bar=True, chunk_size=8)
    assert "VI" in capsys.readouterr().err
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    c = fit(progress=True, chunk_size=8)  # the older name still works
    assert "VI" in capsys.readouterr().err
    np.testing.assert_array_equal(a[0], c[0])
    with pytest.raises(ConfigError, match="progress_bar"):
        pp.VI(elbo(4), guide, optax.adam(0.05), num_steps=3, progress=True, progress_bar=False)


def test_a_second_vi_fit_reuses_the_compiled_fit(monkeypatch):
    """VI's optimisation loop and its final draw live in the one compile cache: a second fit with
    the same model, guide and settings (new key, new data of the same shape) builds no new step
    and gives what a fit with a fresh cache gives."""
    from ppinfer import _compile
    from ppinfer.vi import algorithm as vi_algorithm

    built = []
    real_build = vi_algorithm.build_step
    monkeypatch.setattr(vi_algorithm, "build_step", lambda *a, **k: built.append(1) or real_build(*a, **k))

    def guide(y):
        m = numpyro.param("m", 0.0)
        pp.sample("mu", dist.Normal(m, 0.5))

    alg = pp.VI(elbo(4), guide, optax.adam(0.05), num_steps=20, num_particles=8)
    pp.infer(conjugate, Y, algorithm=alg, key=0)
    assert len(built) == 1
    second = pp.infer(conjugate, Y + 1.0, algorithm=alg, key=1)
    assert len(built) == 1  # reused: nothing traced again
    _compile._CACHE.clear()
    fresh = pp.infer(conjugate, Y + 1.0, algorithm=alg, key=1)
    assert len(built) == 2
    np.testing.assert_array_equal(second.extras["objective_trace"], fresh.extras["objective_trace"])
    np.testing.assert_array_equal(np.asarray(second.samples["mu"]), np.asarray(fresh.samples["mu"]))


def test_equal_programs_and_numpy_data_reuse_the_compiled_run(monkeypatch):
    """Hunt 12: ``pp.sequential(init, step, T)`` rebuilt per call compiled on every call (3
    compiles, 2.5 s each: programs compared by identity); PMMH rebuilt and recompiled its kernel
    for NumPy data of the shape it had run on as a JAX array (6.5 s); FFBS traced init and step
    again on every warm call (82 % of its 12 ms)."""
    from ppinfer import _compile, suspended

    def init():
        return jnp.zeros(())

    def step(x, t, ys):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), ys[t])
        return x

    ys = jnp.asarray(Y[:5])
    make = lambda: pp.sequential(lambda ys: init(), step, 5)
    assert pp.sequential(init, step, 5) == pp.sequential(init, step, 5)
    assert hash(pp.sequential(init, step, 5)) == hash(pp.sequential(init, step, 5))
    assert pp.sequential(init, step, 5) != pp.sequential(init, step, 6)
    assert make() != make()  # a new lambda is a new init: a new program
    program = lambda: pp.sequential(_init_of_ys, step, 5)
    first = pp.infer(program(), ys, algorithm=pp.SMC(64), key=0)
    entries = len(_compile._CACHE)
    again = pp.infer(program(), ys, algorithm=pp.SMC(64), key=0)
    assert len(_compile._CACHE) == entries
    np.testing.assert_array_equal(np.asarray(first.log_weights), np.asarray(again.log_weights))

    from ppinfer.mcmc.algorithm import _shapes

    assert _shapes((np.asarray(Y),)) == _shapes((jnp.asarray(Y),)) == _shapes((np.asarray(Y, np.float64),))
    assert _shapes((np.asarray(Y),)) != _shapes((np.asarray(Y[:5]),))

    traced = []
    real = suspended.can_stop
    monkeypatch.setattr(smc_algorithm, "can_stop", lambda *a, **k: traced.append(1) or real(*a, **k))
    pp.infer(program(), ys, algorithm=pp.FFBS(32), key=0)  # compiles (and traces) the run
    first_call = len(traced)
    for key in range(1, 4):
        pp.infer(program(), ys + key, algorithm=pp.FFBS(32), key=key)
    assert len(traced) == first_call


def _init_of_ys(ys):
    return jnp.zeros(())


@pytest.fixture(scope="module")
def lgssm_run():
    from models.classic import lgssm, simulate_lgssm

    ys = simulate_lgssm(2, 12, 0.9, 0.5, 1.0, 1.0)
    return ys, pp.infer(lgssm(0.9, 0.5, 1.0, 1.0), ys, algorithm=pp.SMC(4000), key=1)


def test_smc_to_arviz_has_no_warnings_and_the_smc_ess(lgssm_run):
    _, r = lgssm_run
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any shape or diagnostics warning fails the test
        idata = r.to_arviz()
        summary = az.summary(idata, var_names=["x"])
    m = int(round(r.final_ess)) // 4 * 4
    assert dict(idata.posterior.sizes) == {"chain": 4, "draw": m // 4, "x_dim_0": 12}
    assert idata.attrs["final_ess"] == pytest.approx(r.final_ess)
    # ArviZ's ESS of the last step (draws from the final weights) agrees with the SMC's own ESS.
    ess_last = float(summary["ess_bulk"].iloc[-1])
    assert 0.7 * r.final_ess < ess_last < 1.3 * r.final_ess, (ess_last, r.final_ess)
    last = float(r.expectation(lambda s: s["x"][-1]))
    sd = float(np.sqrt(r.expectation(lambda s: (s["x"][-1] - last) ** 2)))
    assert abs(float(summary["mean"].iloc[-1]) - last) < 4.5 * sd / np.sqrt(r.final_ess)
    big = r.to_arviz(num_chains=2, num_draws=1000)
    assert dict(big.posterior.sizes)["draw"] == 500


def test_filtering_means_and_variances_match_the_kalman_filter(lgssm_run):
    from semantics import kalman_filter

    ys, r = lgssm_run
    f = r.filtering
    _, mean, var = kalman_filter(0.9, 0.5, 1.0, 1.0, 0.0, 1.0, np.asarray(ys, np.float64))
    ess = np.asarray(f.ess)
    np.testing.assert_allclose(ess, np.asarray(r.ess), rtol=1e-3)  # the SMC's own per-step ESS
    m, v = np.asarray(f.mean("x")), np.asarray(f.var("x"))
    assert m.shape == v.shape == (12,) and f.num_steps == 12
    # 4.5-sigma bounds per step from the filter's own ESS (Var of a Gaussian sample variance: 2σ⁴/n).
    assert np.all(np.abs(m - mean) < 4.5 * np.sqrt(var / ess)), m - mean
    assert np.all(np.abs(v - var) < 4.5 * var * np.sqrt(2 / ess)), v - var
    np.testing.assert_allclose(r.filtering_mean("x"), m)
    with pytest.raises(ConfigError, match="'z'"):
        f.mean("z")
    with pytest.raises(ConfigError, match="history=True"):
        _ = pp.infer(conjugate, Y, algorithm=pp.Importance(16)).filtering


def test_ibis_update_all_equals_the_updates_one_by_one_and_shows_a_bar(capsys):
    from ppinfer.updates import IBIS

    ys = np.random.default_rng(6).normal(0.7, 1.0, (6, 4)).astype(np.float32)
    post = pp.infer(conjugate, ys[0], algorithm=IBIS(num_particles=64, num_moves=2), key=0)
    one_by_one = post
    for batch in ys[1:]:
        one_by_one = one_by_one.update(batch)
    capsys.readouterr()
    together = post.update_all(ys[1:], progress_bar=True)  # the rows of an array: one batch each
    assert "IBIS updates" in capsys.readouterr().err
    assert together.step == one_by_one.step == 6
    np.testing.assert_array_equal(np.asarray(together.log_weights), np.asarray(one_by_one.log_weights))
    np.testing.assert_array_equal(np.asarray(together.samples["mu"]), np.asarray(one_by_one.samples["mu"]))
    same = post.update_all(iter([(b,) for b in ys[1:]]), progress_bar=False)  # tuples, an iterator
    np.testing.assert_array_equal(np.asarray(same.log_weights), np.asarray(one_by_one.log_weights))
    assert post.step == 1  # the posterior it started from is unchanged


@pytest.mark.parametrize(
    "cfg",
    [pp.TemperedSMC(64, ess_target=0.95, num_moves=2), pp.WasteFreeSMC(64, chain_length=4, ess_target=0.95)],
    ids=["tempered", "waste_free"],
)
def test_annealed_smc_chunks_and_progress_bar_do_not_change_the_result(cfg, monkeypatch, capsys):
    from ppinfer.algorithms.tempered import anneal_run

    default = pp.infer(conjugate, Y, algorithm=cfg, key=2)
    monkeypatch.setattr(_talk, "FIRST_CHUNK", 1)
    monkeypatch.setattr(_talk, "CHUNK_SECONDS", 0.0)  # one temperature per chunk
    chunked = pp.infer(conjugate, Y, algorithm=dataclasses.replace(cfg, progress_bar=True), key=2)
    assert cfg.name in capsys.readouterr().err  # the bar was drawn
    assert default.extras["num_steps"] == chunked.extras["num_steps"] > 2
    np.testing.assert_array_equal(np.asarray(default.log_weights), np.asarray(chunked.log_weights))
    np.testing.assert_array_equal(np.asarray(default.samples["mu"]), np.asarray(chunked.samples["mu"]))
    np.testing.assert_array_equal(default.extras["lambdas"], chunked.extras["lambdas"])
    if isinstance(cfg, pp.TemperedSMC):
        whole = jax.jit(
            lambda key, y: anneal_run(key, conjugate, (y,), 64, 2, ("temper", None), ("adaptive", 0.95, 100))
        )(jax.random.PRNGKey(2), Y)
        np.testing.assert_array_equal(np.asarray(whole["log_weights"]), np.asarray(default.log_weights))


@pytest.mark.parametrize("ends_at", [10, 4])
def test_run_in_chunks_hands_the_last_chunk_to_finish_without_reading_its_position(ends_at):
    # The chunk that reaches the end goes straight to finish (one wait for both); a loop that ends
    # earlier (all particles done) is finished after its position says so. Either way finish runs
    # once, on the final carry.
    calls = {"position": [], "finish": []}

    def advance(carry, stop):
        return min(stop, ends_at)

    def position(carry):
        calls["position"].append(carry)
        return carry, carry >= ends_at

    def finish(carry):
        calls["finish"].append(carry)
        return ("out", carry)

    out = _talk.run_in_chunks(advance, position, 0, 10, "t", False, finish=finish)
    assert out == ("out", ends_at) and calls["finish"] == [ends_at]
    # FIRST_CHUNK = 8 steps: one position read (after step 8) when the loop runs to 10; when it
    # ends at 4, the read after the first chunk says so.
    assert calls["position"] == [8 if ends_at == 10 else 4]
    known = ("pace", ends_at)
    _talk._PACE[hash(known)] = 1e-6  # a known fast pace: the whole run is one chunk, no read at all
    calls["position"].clear(), calls["finish"].clear()
    try:
        out = _talk.run_in_chunks(advance, position, 0, 10, "t", False, pace=known, finish=finish)
    finally:
        _talk._PACE.pop(hash(known), None)
    assert out == ("out", ends_at) and calls == {"position": [], "finish": [ends_at]}


@pytest.mark.parametrize("history,large", [(False, False), (True, False), (False, True)])
def test_a_short_warm_run_waits_once(history, large, monkeypatch):
    # A pure filter's phases are one compiled program: a warm run that fits in one chunk is one
    # launch, and its only wait is for the output. With history (or a run too large to copy beside
    # its output) the start and the chunk are dispatched without a wait and the output waits.
    from ppinfer import _compile

    if large:
        monkeypatch.setattr(_compile, "FUSE_MAX_BYTES", 64)
    three = history or large  # the three-program path
    program, cfg = fresh_program(), pp.SMC(32, history=history)
    first = pp.infer(program, YS, algorithm=cfg, key=1)
    pp.infer(program, YS, algorithm=cfg, key=2)  # the pace of this loop is now known
    # A dispatch whose signature is not known compiled falls back to a (counted) waiting call, and
    # the warm run compiles nothing new: the signatures that pick the code are the ones compiled.
    launches, waits = [], []
    real_call, real_dispatch = _compile._Jitted.__call__, _compile._Jitted.dispatch
    launch = lambda self, *a, **k: launches.append(1) or real_dispatch(self, *a, **k)
    wait = lambda self, *a, **k: waits.append(1) or real_call(self, *a, **k)
    monkeypatch.setattr(_compile._Jitted, "dispatch", launch)
    monkeypatch.setattr(_compile._Jitted, "__call__", wait)
    compiled = {k: set(fn._compiled) for k, fn in _compile._CACHE.items() if k[:2] == ("loop", program)}
    again = pp.infer(program, YS, algorithm=cfg, key=1)
    assert (len(launches), len(waits)) == ((2, 1) if three else (1, 0))
    assert {k: _compile._CACHE[k]._compiled for k in compiled} == compiled
    np.testing.assert_array_equal(np.asarray(again.log_weights), np.asarray(first.log_weights))
    keys = [k for k in _compile._CACHE if k[:2] == ("loop", program)]
    assert sorted(k[-1] for k in keys) == (["advance", "output", "start"] if three else ["fused"])
