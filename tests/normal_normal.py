"""The continuous conjugate setting shared by the VI tests: z ~ N(0, 1), y ~ N(z, 1) (posterior
N(y/2, 1/2), log Z = log N(y; 0, 2)) and the Gaussian guide N(m, s) with parameters ``m``, ``s``."""

import numpyro
import numpyro.distributions as dist

import ppinfer as pp


def normal_model(y):
    z = pp.sample("z", dist.Normal(0.0, 1.0))
    pp.observe("y", dist.Normal(z, 1.0), y)


def normal_guide(y):
    m = numpyro.param("m", 0.2)
    s = numpyro.param("s", 0.8, constraint=dist.constraints.positive)
    pp.sample("z", dist.Normal(m, s))
