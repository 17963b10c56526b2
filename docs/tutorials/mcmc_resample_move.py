"""Tutorial: MCMC (NUTS, programmable MH) and resample-move SMC, on a state-space model and on a
token-level language-model program."""

import arviz as az
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.algorithms.resample_move import ResampleMoveSMC
from ppinfer.lm import load_default
from ppinfer.mcmc import MCMC, NUTS, ProgrammableMH
from semantics import kalman_filter


# --- 1. NUTS on a posteriordb model ----------------------------------------------------------------
# posteriordb's eight_schools_noncentered (as in models/posteriordb.py): any NumPyro-style model is a
# ppinfer program. NUTS is NumPyro's own kernel, driven by ppinfer's chain loop (4 chains, vmapped).
def eight_schools(y, sigma):
    mu = pp.sample("mu", dist.Normal(0.0, 5.0))
    tau = pp.sample("tau", dist.HalfCauchy(5.0))
    with pp.plate("J", y.shape[0]):
        theta_tilde = pp.sample("theta_tilde", dist.Normal(0.0, 1.0))
        pp.deterministic("theta", mu + tau * theta_tilde)
        pp.observe("y", dist.Normal(mu + tau * theta_tilde, sigma), y)


y = np.array([28, 8, -3, 7, -1, 1, 18, 12], np.float32)
sigma = np.array([15, 10, 16, 11, 9, 11, 10, 18], np.float32)
nuts = MCMC(NUTS(), num_samples=300, num_warmup=300, num_chains=4)
result = pp.infer(eight_schools, y, sigma, algorithm=nuts, key=0)
print(result)
summary = az.summary(result.to_arviz(), var_names=["mu", "tau"])  # (chain, draw) dims: R-hat, ESS
print(summary[["mean", "sd", "ess_bulk", "r_hat"]].round(2).to_string())
print("posteriordb reference means (Stan, 10 000 draws): mu 4.41, tau 3.60")
print("log_evidence:", result.log_evidence)  # None: MCMC gives no evidence estimate


# --- 2. A programmable MH proposal -------------------------------------------------------------------
# The proposal is itself a program: it reads the current choices and samples new values for some
# sites (named as in the model). The kernel runs it backwards to get the reverse-proposal density.
def normal_model(y):
    mu = pp.sample("mu", dist.Normal(0.0, 1.0))
    with pp.plate("data", y.shape[0]):
        pp.observe("y", dist.Normal(mu, 1.0), y)


def skewed_walk(choices, y):
    # An asymmetric proposal: a drift toward the data mean, so q(x'|x) ≠ q(x|x') and the reverse
    # term matters.
    pp.sample("mu", dist.Normal(0.8 * choices["mu"] + 0.2 * jnp.mean(y), 0.4))


y = np.random.default_rng(0).normal(0.7, 1.0, 20).astype(np.float32)
mh = pp.infer(normal_model, y, algorithm=MCMC(ProgrammableMH(skewed_walk), 2000, 200, num_chains=2), key=0)
accept = float(np.mean(np.asarray(mh.extras["info"].accepted)))
print(
    f"\nprogrammable MH: posterior mean {float(mh.mean('mu')):.3f} (exact {y.sum() / 21:.3f}), "
    f"sd {float(mh.std('mu')):.3f} (exact {1 / np.sqrt(21):.3f}), acceptance {accept:.2f}"
)

# --- 3. Resample-move SMC on a state-space model -----------------------------------------------------
# A linear-Gaussian SSM with an unknown static coefficient a. Plain SMC never redraws a, so
# resampling collapses it onto a few values; resample-move rejuvenates it with random-walk MH on the
# exactly re-scored history after every resampling.
Q, R = 0.5, 0.5


def init(ys):
    a = pp.sample("a", dist.Normal(0.0, 0.5))
    return a, jnp.zeros(())


def step(state, t, ys):
    a, x = state
    x = pp.sample("x", dist.Normal(jnp.where(t == 0, 0.0, a * x), jnp.sqrt(jnp.where(t == 0, 1.0, Q))))
    pp.observe("y", dist.Normal(x, np.sqrt(R)), ys[t])
    return a, x


rng = np.random.default_rng(4)
x_true = np.zeros(60)
x_true[0] = rng.normal()
for t in range(1, 60):
    x_true[t] = 0.8 * x_true[t - 1] + rng.normal(0.0, np.sqrt(Q))
ys = (x_true + rng.normal(0.0, np.sqrt(R), 60)).astype(np.float32)
ssm = pp.sequential(init, step, lambda ys: ys.shape[0])
grid = np.linspace(-2.5, 2.5, 1001)
log_post = np.array([kalman_filter(a, Q, 1.0, R, 0.0, 1.0, ys)[0] for a in grid]) - 0.5 * grid**2 / 0.25
w = np.exp(log_post - log_post.max())
w /= w.sum()
print(f"\nSSM, exact posterior of a: mean {np.sum(w * grid):.3f}")
for label, alg in (
    ("SMC", pp.SMC(400)),
    ("resample-move", ResampleMoveSMC(400, move_sites=("a",), num_moves=2)),
):
    r = pp.infer(ssm, ys, algorithm=alg, key=0)
    distinct = len(np.unique(np.asarray(r.samples["a"])))
    a_mean = float(r.mean("a"))
    print(f"{label:>14s}: mean of a {a_mean:.3f}, {distinct} distinct values, log Z {r.log_evidence:.2f}")

# --- 4. Resample-move on a token-level LM program ----------------------------------------------------
# The embedded LM writes at least 4 tokens after "def" under a hard constraint: no letter 'e'. The
# locally constrained proposal samples only allowed tokens (weight: the allowed mass). After each
# resampling, the suffix move redraws every particle's last 3 tokens from the same proposal — the LM
# context is rebuilt by re-feeding the kept prefix — and accepts by MH with the ratio of the redrawn
# and old suffixes' weights. The target, and log Z, are those of plain SMC.
lm = load_default()
T, MIN_LEN = 10, 4
p = tk.prompt(lm, "<|endoftext|>def", max_new_tokens=T)
has_e = jnp.array([b"e" in t.lower() for t in lm.vocab_bytes]).at[lm.eos_id].set(False)
is_eos = jnp.arange(has_e.shape[0]) == lm.eos_id


def token_step(ctx, t, p):
    tok = pp.sample("tok", ctx.next_token())
    pp.condition("no_e", ~has_e[tok])
    pp.condition("min_length", ~p.is_eos(tok) | (t >= MIN_LEN))
    pp.stop(p.is_eos(tok))
    return ctx.extend(p, tok)


def allowed_tokens(ctx, t, p):
    pp.sample("tok", tk.masked_next_token(ctx, ~has_e & (~is_eos | (t >= MIN_LEN))))


program = pp.sequential(tk.Context.start, token_step, T)
print()
for label, alg in (
    ("SMC", pp.SMC(32, proposal=allowed_tokens)),
    ("resample-move", ResampleMoveSMC(32, regenerate_suffix=3, num_moves=1, proposal=allowed_tokens)),
):
    r = pp.infer(program, p, algorithm=alg, key=0)
    texts = tk.texts(r.state, lm.tokenizer, lm.eos_id)
    line = f"{label:>14s}: log Z {r.log_evidence:.2f}, {len(set(texts))} distinct texts of {len(texts)}"
    if "suffix_acceptance_rate" in r.extras:
        rates = np.asarray(r.extras["suffix_acceptance_rate"])[np.asarray(r.resampled)]
        line += f", suffix-move acceptance {float(np.mean(rates)):.2f}"
    print(line)
    for i in np.argsort(-np.asarray(r.weights))[:3]:
        print(f"{'':>16s}{float(r.weights[i]):.3f}  def{texts[i]!r}")
