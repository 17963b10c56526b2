"""Importance sampling on a NumPyro model with a known posterior (Beta-Bernoulli), with the prior and
with a guide as the proposal; ArviZ summary of the weighted particles."""

import sys
from pathlib import Path

import numpy as np
import numpyro.distributions as dist
from scipy.special import betaln

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppinfer as pp  # noqa: E402
from models.classic import beta_bernoulli  # noqa: E402


def main(num_particles: int = 5000) -> dict:
    """Prints the comparison and an ArviZ summary; returns the exact posterior mean and sd of p and
    log Z, and per proposal the weighted ``mean``, ``log_z`` and ``ess``."""
    flips = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], np.float32)
    heads, tails = flips.sum(), len(flips) - flips.sum()
    model = beta_bernoulli(1.0, 1.0)
    exact_mean = (1 + heads) / (2 + len(flips))
    exact_log_z = betaln(1 + heads, 1 + tails)
    a, b = 1 + heads, 1 + tails
    exact_sd = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    out = {"exact": {"mean": float(exact_mean), "sd": float(exact_sd), "log_z": float(exact_log_z)}}

    def guide(flips):
        pp.sample("p", dist.Beta(1 + heads * 0.9, 1 + tails * 0.9))

    for name, proposal in [("prior", None), ("guide", guide)]:
        r = pp.infer(model, flips, algorithm=pp.Importance(num_particles, proposal=proposal), key=0)
        print(
            f"{name:>6}: E[p] {float(r.mean('p')):.4f} (exact {exact_mean:.4f})  log Z "
            f"{r.log_evidence:.4f} (exact {exact_log_z:.4f})  ESS {r.final_ess:.0f}/{num_particles}"
        )
        out[name] = {"mean": float(r.mean("p")), "log_z": float(r.log_evidence), "ess": r.final_ess}
    import arviz as az

    print(az.summary(r.to_arviz(), kind="stats"))
    return out


if __name__ == "__main__":
    main()
