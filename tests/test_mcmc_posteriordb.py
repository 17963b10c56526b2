"""NUTS through ppinfer against posteriordb reference posteriors (Stan, 10 000 draws): every
reference mean within max(3·MCSE, 0.1·sd), MCSE from ArviZ on our 2 chains.

The bound's false-failure rate: 3·MCSE alone is ~0.3 % per parameter; the 0.1·sd floor (which
dominates at these chain lengths) makes it far smaller."""

import arviz as az
import numpy as np
import pytest

import ppinfer as pp
from models.posteriordb import flatten_draws, load, reference
from ppinfer.mcmc import MCMC, NUTS

FAST = [
    "eight_schools-eight_schools_noncentered",
    "kidiq-kidscore_momhsiq",
    "low_dim_gauss_mix-low_dim_gauss_mix",
]
SLOW = ["arK-arK", "garch-garch11", "gp_pois_regr-gp_pois_regr"]


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_nuts_matches_reference_means(name):
    model, args = load(name)
    r = pp.infer(model, *args, algorithm=MCMC(NUTS(), 300, 300, num_chains=2), key=0)
    chains = {k: np.asarray(v) for k, v in r.chains().items()}
    draws = flatten_draws({k: v.reshape(-1, *v.shape[2:]) for k, v in chains.items()})
    for param, ref in reference(name).items():
        x = draws[param].reshape(2, -1)
        mcse = float(az.mcse(az.convert_to_dataset(x), method="mean")["x"])
        bound = max(3 * mcse, 0.1 * ref["sd"])
        assert abs(x.mean() - ref["mean"]) <= bound, (param, x.mean(), ref["mean"], bound)
