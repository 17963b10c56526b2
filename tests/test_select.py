"""Selections (ppinfer.kernels.select): each is valid exactly, from its outputs alone.

Validity: for u ~ U[0,1)^{n_out}, E[Σ_j exp(w'_j) δ(a_j)] = Σ_i exp(w_i) δ(i). The law of the
outputs comes from ``semantics.selection_outcomes`` (breakpoints found by bisection on the real
function), so the check is exact up to float64 round-off (bound 1e-10: no false failures).
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import ppinfer as pp
from ppinfer.kernels.select import (
    Adaptive,
    Beam,
    FearnheadClifford,
    Grouped,
    Multinomial,
    Residual,
    Stratified,
    Systematic,
    as_selection,
    draw_uniforms,
)
from semantics import selection_outcomes

WEIGHTS = [
    np.log([0.1, 0.2, 0.3, 0.4]),
    np.log([0.7, 0.1, 0.1, 0.1]),
    np.array([0.0, -np.inf, -1.0, -0.3]),
]


def expected_measure_error(selection, lw, n_out=None):
    masses = np.zeros(len(lw))
    for p, anc, new in selection_outcomes(selection, lw, n_out):
        for a, w in zip(anc, new, strict=True):
            masses[a] += p * np.exp(w)
    return np.max(np.abs(masses - np.exp(lw)))


SELECTIONS = [
    pytest.param(Multinomial(), id="multinomial"),
    pytest.param(Stratified(), id="stratified"),
    pytest.param(Systematic(), id="systematic"),
    pytest.param(Residual(), id="residual"),
    pytest.param(Adaptive(Systematic(), 0.9), id="adaptive"),
    pytest.param(Grouped(Stratified(), 2), id="grouped"),
    pytest.param(FearnheadClifford("systematic"), id="fearnhead-clifford"),
    pytest.param(FearnheadClifford("stratified"), id="fearnhead-clifford-stratified"),
]


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("index", range(len(WEIGHTS)))
def test_every_selection_is_valid_exactly(selection, index):
    assert expected_measure_error(selection, WEIGHTS[index]) < 1e-10


def test_selections_with_fewer_slots_are_valid():
    for selection in (Multinomial(), Stratified(), Systematic(), Residual(), FearnheadClifford()):
        assert expected_measure_error(selection, WEIGHTS[0], 3) < 1e-10


def test_a_selection_that_ignores_the_weights_is_invalid():
    @dataclass(frozen=True)
    class Uniform:
        def __call__(self, u, lw):
            anc = jnp.minimum(jnp.floor(u * lw.shape[0]), lw.shape[0] - 1).astype(jnp.int32)
            return anc, jnp.full(u.shape, jax.scipy.special.logsumexp(lw) - jnp.log(u.shape[0]))

    assert expected_measure_error(Uniform(), WEIGHTS[0]) > 0.05


def test_zero_weight_particles_are_never_selected_and_dead_populations_give_no_nan():
    for selection in (Multinomial(), Stratified(), Systematic(), Residual(), FearnheadClifford()):
        for _, anc, new in selection_outcomes(selection, WEIGHTS[2]):
            assert all(w == -np.inf for a, w in zip(anc, new, strict=True) if a == 1)
        anc, lw = selection(jnp.full(4, 0.5), jnp.full(4, -jnp.inf))
        assert np.all(np.asarray(anc) >= 0) and not np.any(np.isnan(np.asarray(lw)))


def test_systematic_draws_one_uniform_and_adaptive_triggers_on_ess():
    u = np.asarray(draw_uniforms(Systematic(), jax.random.PRNGKey(0), 5, jnp.float32))
    assert u.shape == (5,) and np.all(u == u[0])
    even = jnp.zeros(4)
    assert not bool(Adaptive(Systematic(), 0.5).trigger(even))
    assert bool(Adaptive(Systematic(), 0.5).trigger(jnp.array([0.0, -9.0, -9.0, -9.0])))
    anc, lw = Adaptive(Systematic(), 0.5)(jnp.full(4, 0.3), even)
    assert np.array_equal(np.asarray(anc), np.arange(4)) and np.array_equal(np.asarray(lw), np.zeros(4))


def test_as_selection_names_and_errors():
    assert as_selection("stratified") == Stratified()
    assert as_selection("systematic", 0.5) == Adaptive(Systematic(), 0.5)
    with pytest.raises(pp.ConfigError, match="unknown resampling scheme"):
        as_selection("nope")
    with pytest.raises(pp.ConfigError, match="selection"):
        pp.SMC(8, resampling=3)

    @dataclass
    class Unhashable:  # a mutable dataclass has no hash: it could not key the compile cache
        def __call__(self, u, lw):
            return Systematic()(u, lw)

    with pytest.raises(pp.ConfigError, match="hashable"):
        pp.SMC(8, resampling=Unhashable())
    for keep in (0, 1.5, True, "2"):
        with pytest.raises(pp.ConfigError, match="Beam's keep must be an integer >= 1"):
            Beam(keep)
    with pytest.raises(pp.ConfigError, match="unknown selection scheme 'multinomial' for Steer"):
        FearnheadClifford("multinomial")


def test_a_user_selection_runs_in_smc_and_a_malformed_one_is_a_clear_error():
    def init():
        return pp.sample("x", dist.Normal(0.0, 1.0))

    def step(x, t):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), 0.5)
        return x

    prog = pp.sequential(init, step, 4)
    a = pp.infer(prog, algorithm=pp.SMC(64, resampling="stratified"), key=2)
    b = pp.infer(prog, algorithm=pp.SMC(64, resampling=Stratified()), key=2)
    assert np.array_equal(np.asarray(a.log_weights), np.asarray(b.log_weights))

    @dataclass(frozen=True)
    class WrongShape:
        def __call__(self, u, lw):
            return jnp.zeros(3, jnp.int32), lw

    with pytest.raises(pp.ConfigError, match="a selection must return"):
        pp.infer(prog, algorithm=pp.SMC(8, resampling=WrongShape()), key=0)
    # A user's selection that cannot be called as select(u, log_weights), that raises, or whose values
    # are out of range is named in a clear error (before: a raw TypeError or ZeroDivisionError from
    # inside the traced step, and a silent NaN log Ẑ or a silently clamped gather).
    with pytest.raises(pp.ConfigError, match=r"called as select\(u: f32\[n_out\], log_weights"):
        pp.SMC(8, resampling=lambda u: u)

    def raises(u, lw):
        return 1 / 0

    with pytest.raises(
        pp.ConfigError, match=r"selection .*raises.* failed on \(u: f32\[8\], .*ZeroDivisionError"
    ):
        pp.infer(prog, algorithm=pp.SMC(8, resampling=raises), key=0)
    # NumPy code on the traced weights is the selection's error (it was blamed on the program).
    with pytest.raises(pp.ConfigError, match=r"selection <ufunc 'add'> failed .*TracerArrayConversionError"):
        pp.infer(prog, algorithm=pp.SMC(8, resampling=np.add), key=0)

    def nan_weights(u, lw):
        return Systematic()(u, lw)[0], jnp.full_like(lw, jnp.nan)

    def out_of_range(u, lw):
        return Systematic()(u, lw)[0] + lw.shape[0], lw

    def plus_inf(u, lw):
        return Systematic()(u, lw)[0], jnp.full_like(lw, jnp.inf)

    expected = r"log Ẑ is nan after step \d+: .* a selection \(resampling=…\) returned one, an ancestor"
    for broken in (nan_weights, out_of_range, plus_inf):
        with pytest.raises(pp.InferenceError, match=expected):
            pp.infer(prog, algorithm=pp.SMC(8, resampling=broken, ess_threshold=1.0), key=0)
    # The check costs the built-in selections nothing and passes a valid user selection.
    c = pp.infer(prog, algorithm=pp.SMC(64, resampling=lambda u, lw: Stratified()(u, lw)), key=2)
    assert np.array_equal(np.asarray(a.log_weights), np.asarray(c.log_weights))


def _walk():
    def step(x, t):
        x = pp.sample("x", dist.Normal(x, 1.0))
        pp.observe("y", dist.Normal(x, 1.0), 0.5)
        return x

    return pp.sequential(lambda: jnp.zeros(()), step, 4)


def test_a_selection_that_loses_every_weight_or_wraps_an_index_is_reported():
    # All new weights −inf from a live population: a ZeroEvidenceError blamed the model before.
    def kills(u, lw):
        return Systematic()(u, lw)[0], jnp.full_like(lw, -jnp.inf)

    with pytest.raises(pp.InferenceError, match="only zero weights from a live population"):
        pp.infer(_walk(), algorithm=pp.SMC(8, resampling=kills, ess_threshold=1.0), key=0)

    # 64-bit ancestors past int32 wrapped into range (a valid-looking run) before.
    def wraps(u, lw):
        return Systematic()(u, lw)[0].astype(jnp.int64) + 2**32, lw

    with jax.enable_x64(True):
        with pytest.raises(pp.InferenceError, match="ancestor out of range"):
            pp.infer(_walk(), algorithm=pp.SMC(8, resampling=wraps, ess_threshold=1.0), key=0)

    # A selection declaring num_groups that moves a particle to another group.
    @dataclass(frozen=True)
    class Leaky:
        num_groups: int = 2

        def __call__(self, u, lw):
            return jnp.zeros(u.shape[0], jnp.int32), jnp.full_like(lw, jax.nn.logsumexp(lw) - jnp.log(8.0))

    with pytest.raises(pp.InferenceError, match="out of its group"):
        pp.infer(_walk(), algorithm=pp.SMC(8, resampling=Leaky(), ess_threshold=1.0), key=0)


def test_a_selections_optional_members_and_groups_are_checked():
    sysm = Systematic()

    @dataclass(frozen=True)
    class VectorTrigger:
        def trigger(self, lw, ess):
            return lw > 0  # bool[N], not bool[]: a raw "Pred must be a scalar" before

        def __call__(self, u, lw):
            return sysm(u, lw)

    @dataclass(frozen=True)
    class RaisingTrigger:
        def trigger(self, lw, ess):
            raise RuntimeError("boom")

        def __call__(self, u, lw):
            return sysm(u, lw)

    @dataclass(frozen=True)
    class ShortDraw:
        def draw(self, key, n, dtype):
            return jax.random.uniform(key, (1,), dtype)  # blamed on the selection's return before

        def __call__(self, u, lw):
            return sysm(u, lw)

    @dataclass(frozen=True)
    class IntegerWeights:
        def __call__(self, u, lw):
            return sysm(u, lw)[0], jnp.zeros(u.shape[0], jnp.int32)

    cases = [
        (VectorTrigger(), r"trigger of the selection .* must return one boolean"),
        (RaisingTrigger(), r"trigger of the selection .* failed .*RuntimeError: boom"),
        (ShortDraw(), r"draw\(key, 8, dtype\) must return f\[8\], got shape \(1,\)"),
        (IntegerWeights(), "log weights must be floats"),
        (Grouped(sysm, 3), "multiples of the number of groups"),
    ]
    for selection, message in cases:
        with pytest.raises(pp.ConfigError, match=message):
            pp.infer(_walk(), algorithm=pp.SMC(8, resampling=selection, ess_threshold=1.0), key=0)
    # Called directly: a raw reshape TypeError, ZeroDivisionError or cond type error before.
    u, lw = jnp.full(6, 0.5), jnp.zeros(6)
    with pytest.raises(pp.ConfigError, match="num_groups"):
        Grouped(sysm, 0)
    with pytest.raises(pp.ConfigError, match="multiples"):
        Grouped(sysm, 4)(u, lw)
    with pytest.raises(pp.ConfigError, match="as many outputs as inputs"):
        Adaptive(sysm, 0.5)(u[:3], lw)
    from ppinfer.population import Population
    from ppinfer.resample import resample_groups

    with pytest.raises(pp.ConfigError, match="multiples"):
        resample_groups(jax.random.PRNGKey(0), Population(jnp.arange(6.0), lw), "systematic", 4)
