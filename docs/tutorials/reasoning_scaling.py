"""Tutorial: inference-time scaling as inference — particle filtering with a process reward model
against best-of-N and beam search, on the embedded model's arithmetic task (small size)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for models/

import ppinfer as pp  # noqa: E402
from models.arith_corpus import problems  # noqa: E402
from ppinfer import reasoning as rs  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402

lm = load_default()  # a 1.6M-parameter GPT-2 trained on "Q: 7+2*4 = ? Step: 2*4=8. Step: 7+8=15. A: 15"
spec = rs.StepSpec(
    decode=lm.tokenizer.decode,
    delimiters=tuple(lm.tokenizer.encode(".")),  # one SMC step = one reasoning step, ending at "."
    eos_id=lm.eos_id,  # the solution ends at EOS (after "A: 15")
    max_chunk=12,
    max_steps=4,
    prm=rs.arithmetic_prm,  # the process reward: every completed step's arithmetic holds
)
program = rs.reasoning_program(spec)

# Held-out problems (seed 2026 + size: not a seed the model was trained with), 2 and 3 operands.
questions = [p for size in (2, 3) for p in problems(2026 + size, 2, (size,))]
budgets = (1, 4, 16)
methods = ("sampling", "best_of_n", "beam", "particle_filter")
solved = {m: np.zeros((len(budgets), len(questions))) for m in methods}
cost = {m: np.zeros(len(budgets)) for m in methods}

for j, problem in enumerate(questions):
    args = rs.question_args(lm, spec, "<|endoftext|>" + problem.question, pad_to=24)
    truth = problem.solve()[1]
    # Sampling and best-of-N: the first n samples of one pool of 16 are what Sampling(n) and
    # BestOfN(n) with this key would draw (a particle's draws depend on its index, not on N).
    pool = pp.infer(program, args, algorithm=rs.Sampling(max(budgets)), key=j)
    q, sols, answers = pool.extras["question"], pool.extras["solutions"], pool.extras["answers"]
    lengths = np.asarray(pool.samples["length"])
    prm_scores = [rs.arithmetic_prm(q, s) for s in sols]  # the verifier scores each full solution
    for b, n in enumerate(budgets):
        best = int(np.argmax(prm_scores[:n]))
        solved["sampling"][b, j] = answers[0] == truth
        solved["best_of_n"][b, j] = answers[best] == truth
        cost["sampling"][b] += lengths[0]
        cost["best_of_n"][b] += lengths[:n].sum()
        for name, alg in (("beam", rs.BeamSearch(n, expand=4)), ("particle_filter", rs.ParticleFilter(n))):
            r = pp.infer(program, args, algorithm=alg, key=100 + j)
            solved[name][b, j] = r.extras["answer"] == truth
            cost[name][b] += r.extras["generated_tokens"]

print(f"{len(questions)} held-out problems: " + ", ".join(p.question for p in questions))
print(f"{'method':16} " + " ".join(f"{'N=' + str(n):>12}" for n in budgets))
for m in methods:
    pairs = zip(solved[m].mean(1), cost[m] / len(questions), strict=True)
    cells = " ".join(f"{acc:4.2f} ({tok:3.0f}t)" for acc, tok in pairs)
    print(f"{m:16} {cells}")
print("(accuracy, and mean generated tokens per problem)")

# Particle Gibbs: 4 sweeps of 4 particles (budget 16); after each sweep a reference is drawn and the
# next sweep keeps it pinned in slot 0 (teacher-forced), generating 3 fresh particles around it.
p = questions[-1]
args = rs.question_args(lm, spec, "<|endoftext|>" + p.question, pad_to=24)
r = pp.infer(program, args, algorithm=rs.ParticleGibbs(4, num_iterations=4), key=7)
print(f"\nparticle Gibbs on {p.question} (true answer {p.solve()[1]}): answer {r.extras['answer']}")
for m, ref in enumerate(r.extras["references"]):
    print(f"  reference after sweep {m}: {ref!r}")
ex = r.extras
print(
    f"  generated {ex['generated_tokens']} tokens, "
    f"forced {ex['forced_tokens']}, {ex['reward_calls']} PRM calls"
)

out = Path(__file__).resolve().parent / "_generated"
out.mkdir(exist_ok=True)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(5.5, 3.6))
for m in methods:
    ax.plot(budgets, solved[m].mean(1), marker="o", label=m)
ax.set_xscale("log", base=2)
ax.set_xticks(budgets, [str(n) for n in budgets])
ax.set_xlabel("budget (particles / samples)")
ax.set_ylabel("accuracy")
ax.set_title(f"{len(questions)} held-out arithmetic problems, exact PRM")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "reasoning_scaling.png", dpi=100)
