"""Validate building blocks with the reference semantics.

1. Exact inference of the sprinkler network by enumeration, and its denotation.
2. A custom resampler ("keep the best particle") fails the exact validity check; the built-in
   schemes pass it.
3. SMC with 2 particles on a 2-step HMM: ``semantics.check_exact`` runs pp.SMC's own compiled loop on
   every outcome of its randomness; its expected output measure equals the program's denotation —
   and with the "keep the best" selection it does not.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppinfer as pp  # noqa: E402
import semantics  # noqa: E402
from models.classic import discrete_hmm, sprinkler  # noqa: E402


def keep_the_best(u, log_weights):
    """A selection (u: f32[n], log_weights: f32[n]) -> (ancestors, log_weights) that always copies
    the heaviest particle: not valid."""
    n = u.shape[0]
    lse = jax.scipy.special.logsumexp(log_weights)
    return jnp.full(n, jnp.argmax(log_weights), jnp.int32), jnp.full(n, lse - jnp.log(n))


def main() -> dict:
    """Prints the checks; returns ``p_rain`` (P(rain | wet grass)) and ``z`` by enumeration, the
    sprinkler's ``denotation`` (a :class:`semantics.Measure`), the resampling errors by scheme
    (``resample_errors``, with ``keep-best``), and the exact SMC check's ``smc_error`` and, with the
    keep-best selection, ``smc_keep_best_error``."""
    r = pp.infer(sprinkler(), algorithm=pp.Enumerate())
    out = {"p_rain": float(r.mean("rain")), "z": float(np.exp(r.log_evidence)), "resample_errors": {}}
    print(f"P(rain | wet grass) = {out['p_rain']:.4f}; Z = {out['z']:.4f}")
    out["denotation"] = semantics.denote(sprinkler())
    print(out["denotation"])

    with jax.enable_x64(True):
        weights = [0.3, -0.4, -1.5]
        for scheme in ("multinomial", "systematic", "stratified", "residual"):
            err = semantics.check_resample(scheme, weights)
            print(f"{scheme:>12} resampling: max |E[measure after] - measure before| / Z = {err:.1e}")
            out["resample_errors"][scheme] = float(err)
        err = semantics.check_resample(keep_the_best, weights)
        print(f"{'keep-best':>12} resampling: max |E[after] - before| / Z = {err:.1e}  <- invalid")
        out["resample_errors"]["keep-best"] = float(err)

        hmm = discrete_hmm(
            np.array([0.6, 0.4]), np.array([[0.7, 0.3], [0.2, 0.8]]), np.array([-1.0, 1.0]), 1.0
        )
        ys = np.array([0.5, -0.3])
        err = semantics.check_exact(hmm, ys, algorithm=pp.SMC(2, ess_threshold=1.0)).max_abs_error
        print(f"SMC (N=2, T=2, systematic): max |E[SMC measure] - denotation| = {err:.1e}")
        out["smc_error"] = float(err)
        bad = pp.SMC(2, resampling=keep_the_best, ess_threshold=1.0)
        err = semantics.check_exact(hmm, ys, algorithm=bad).max_abs_error
        print(f"SMC (N=2, T=2, keep-best):  max |E[SMC measure] - denotation| = {err:.1e}  <- invalid")
        out["smc_keep_best_error"] = float(err)
    return out


if __name__ == "__main__":
    main()
