"""Tutorial: SMC on a hidden Markov model, checked against the exact forward algorithm."""

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import ppinfer as pp
from semantics import hmm_forward

# A 2-state weather model: the hidden state is 'calm' (0) or 'stormy' (1), the observation is a
# noisy wind-speed reading.
init_probs = jnp.array([0.7, 0.3])
transition = jnp.array([[0.9, 0.1], [0.3, 0.7]])
means = jnp.array([2.0, 8.0])


def init(ys):
    return jnp.zeros((), jnp.int32)


def step(x, t, ys):
    probs = jnp.where(t == 0, init_probs, transition[x])
    x = pp.sample("x", dist.Categorical(probs=probs))
    pp.observe("y", dist.Normal(means[x], 2.0), ys[t])
    return x


ys = np.array([1.5, 3.0, 7.5, 9.0, 4.0, 2.5, 8.5, 7.0], np.float32)
program = pp.sequential(init, step, num_steps=lambda ys: ys.shape[0])

result = pp.infer(program, ys, algorithm=pp.SMC(num_particles=2000), key=0)
print(result)

# The smoothing marginals p(x_t = stormy | y_{0:T-1}) from the particle trajectories ...
print("P(stormy) by step:", np.round(np.asarray(result.mean("x")), 3))

# ... and the exact answer: log Z and the filtering distribution of the last step.
log_lik = np.stack(
    [-0.5 * ((ys - m) / 2.0) ** 2 - np.log(2.0 * np.sqrt(2 * np.pi)) for m in means], 1
)
log_z, filtering = hmm_forward(np.asarray(init_probs), np.asarray(transition), log_lik)
print(f"log Z: SMC {result.log_evidence:.4f}, exact {log_z:.4f}")
print(
    f"P(stormy at the last step): SMC {float(result.mean('x')[-1]):.3f}, exact {filtering[-1, 1]:.3f}"
)

# Exact enumeration of the same program (2^8 executions) agrees too.
exact = pp.infer(program, ys, algorithm=pp.Enumerate())
print(
    f"Enumerate: log Z {exact.log_evidence:.4f}, P(stormy) by step {np.round(np.asarray(exact.mean('x')), 3)}"
)
