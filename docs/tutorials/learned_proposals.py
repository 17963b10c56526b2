"""Tutorial: learned proposals and twists for SMC — a state-space model and a constrained LM program."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: models/, semantics/
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ppinfer as pp  # noqa: E402
from models.classic import lgssm, simulate_lgssm  # noqa: E402
from models.lm_programs import PYTHON_DEF_PATTERN  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.algorithms.smc import smc_run  # noqa: E402
from ppinfer.constraints import regex_automaton  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402
from ppinfer.vi import VI, VSMC, affine_gaussian_proposal, bind_params  # noqa: E402
from ppinfer.vi import token_twist as tt  # noqa: E402
from semantics import kalman_filter  # noqa: E402

OUT = Path(__file__).resolve().parent / "_generated"
OUT.mkdir(exist_ok=True)


def replicate(program, args, n, reps, proposal, steps):
    """log Ẑ: f[R] and per-step ESS/N: f[R, T] of R independent SMC runs (vmapped, one jit)."""

    @jax.jit
    def run(keys, args):
        def one(k):
            out = smc_run(k, program, args, n, steps, "systematic", 0.5, proposal)
            return out["log_evidence"], out["ess"] / n

        return jax.vmap(one)(keys)

    log_z, ess = run(jax.random.split(jax.random.PRNGKey(123), reps), args)
    return np.asarray(log_z), np.asarray(ess)


# --- 1. A state-space model: learn q(x_t | x_{t-1}, y_t) with the variational-SMC objective. -------
A, Q, C, R = 0.9, 1.0, 1.0, 0.1  # precise observations: the bootstrap filter's weights are uneven
ys = jnp.asarray(simulate_lgssm(0, 30, A, Q, C, R))
ssm = lgssm(A, Q, C, R)
log_z_exact = kalman_filter(A, Q, C, R, 0.0, 1.0, np.asarray(ys))[0]

# The proposal is a program with numpyro.param sites: N(w·[x_{t-1}, y_t, 1], softplus(v·[...])).
guide = affine_gaussian_proposal("x", lambda x, t, ys: jnp.stack([x, ys[t]]), num_features=2)
vi = VI(VSMC(num_particles=16), guide, optax.adam(optax.exponential_decay(0.1, 300, 0.1)), 300)
fitted = pp.infer(ssm, ys, algorithm=vi, key=0)
learned = bind_params(guide, fitted.extras["params"])
trace = fitted.extras["objective_trace"]
print(f"VSMC objective E[log Ẑ] (N=16): {np.mean(trace[:10]):.2f} -> {np.mean(trace[-10:]):.2f}")

ssm_rows = {}
for name, proposal in (("bootstrap", None), ("learned", learned)):
    log_z, ess = replicate(ssm, (ys,), 32, 100, proposal, 30)
    ssm_rows[name] = ess.mean(0)
    print(
        f"LGSSM {name:>9}: mean ESS/N {ess.mean():.3f}  var log Ẑ {np.var(log_z):.4f}  "
        f"mean log Ẑ {np.mean(log_z):.3f} (exact {log_z_exact:.3f})"
    )

# --- 2. A constrained LM program: learn a token-level twist. -------------------------------------
# Target: "def" + a header matching the pattern + EOS, within T tokens. The locally constrained
# proposal sees the pattern, not the budget; the twist head sees the automaton state, the step, the
# LM's last hidden state and the last token, and is fitted by soft value iteration.
T = 14
lm = load_default()
automaton = regex_automaton(PYTHON_DEF_PATTERN, lm.vocab_bytes, lm.eos_id)
p = tk.prompt(lm, "<|endoftext|>def", T)
program = tt.twisted_program(T)
init = tt.init_token_twist(0, automaton, tt.hidden_state_features(lm), T)
twist, info = tt.fit_token_twist(1, p, automaton, init, num_iterations=20, optimizer=optax.adam(2e-2))
print(f"twist Bellman loss: {info.loss_trace[0]:.2f} -> {info.loss_trace[-1]:.2f}")

token_rows = {}
for name, tw in (("masked", twist.off()), ("twisted", twist)):
    log_z, ess = replicate(program, (p, automaton, tw), 32, 20, tt.twisted_proposal, T)
    token_rows[name] = ess.mean(0)
    ok = np.isfinite(log_z)
    print(
        f"LM {name:>8}: mean ESS/N {ess.mean():.3f}  var log Ẑ {np.var(log_z[ok]):.4f}  "
        f"mean log Ẑ {np.mean(log_z[ok]):.3f}  runs with Ẑ = 0: {int(np.sum(~ok))}/20"
    )

# Same final target, same N: the twisted run's last-step ESS is the one that matters.
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, rows, title in (
    (axes[0], ssm_rows, "state-space model"),
    (axes[1], token_rows, "token-level program"),
):
    for name, ess in rows.items():
        ax.plot(np.arange(len(ess)), ess, marker="o", ms=3, label=name)
    ax.set(title=title, xlabel="step", ylabel="mean ESS / N (before resampling)", ylim=(0, 1.05))
    ax.legend()
fig.tight_layout()
fig.savefig(OUT / "learned_proposals.png", dpi=100)
