"""Inference-time scaling as inference: accuracy vs budget on held-out synthetic arithmetic.

Every algorithm of :mod:`ppinfer.reasoning` runs on the embedded default LM for held-out problems of
graded difficulty (2, 3 and 4 operands, drawn with seed 2026; training used seeds 0, 1 and 3–7), at
budgets of 1, 2, 4, … 32 particles/samples, once with the exact verifiers (arithmetic PRM, gold-answer
ORM) and once with noisy ones (each score flipped at rate 0.2). A problem counts as solved when the
algorithm's answer equals the true value. Prints a table (accuracy per budget, and the mean generated
tokens and reward calls at the largest budget), writes ``out/reasoning_scaling.png`` and ends with a
``RESULT`` line.

Algorithms: ``sampling`` (one sample), ``vote`` (majority vote of N samples), ``vote_prm`` (votes
weighted by the PRM's score of each full solution), ``bon_orm`` (best-of-N with the ORM: with the exact
ORM this is an oracle, pass@N), ``bon_prm`` (best-of-N scored by the PRM of the full solution),
``pf`` (Puri et al.'s particle filter, weighted vote), ``pf_argmax``, ``fk`` (the Feynman–Kac filter,
ESS-adaptive resampling, weighted vote) and ``beam`` (step-level beam search, expand 4).

    .venv/bin/python benchmarks/bench_reasoning_scaling.py            # 12 problems, budgets 1…32
    .venv/bin/python benchmarks/bench_reasoning_scaling.py --quick    # 3 problems, budgets 1, 4

``--quick`` cannot finish in much under a minute on the shared 2-core CPU: most of its time is the
compilation of the step loop (one per program variant and particle count, ~5–8 s each; host
callbacks keep them out of JAX's persistent cache).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ppinfer as pp  # noqa: E402
from models.arith_corpus import problems  # noqa: E402
from ppinfer import reasoning as rs  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402

HELDOUT_SEED = 2026
NOISE_RATE = 0.2
PAD_TO = 24
TARGETS = (0.25, 0.5, 0.75)


def algorithms(n: int, prm, orm) -> dict:
    """The algorithms at budget ``n`` with the process reward ``prm`` and outcome reward ``orm``."""
    return {
        "sampling": rs.Sampling(n),
        "vote": rs.MajorityVote(n),
        "vote_prm": rs.MajorityVote(n, reward=prm),
        "bon_orm": rs.BestOfN(n, outcome=orm),
        "bon_prm": rs.BestOfN(n, outcome=prm),
        "pf": rs.ParticleFilter(n, answer="vote"),
        "pf_argmax": rs.ParticleFilter(n, answer="argmax"),
        "fk": rs.FeynmanKacFilter(n, answer="vote"),
        "beam": rs.BeamSearch(n, expand=4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 problems, budgets 1 and 4")
    parser.add_argument("--per-size", type=int, default=4, help="problems per size (full run)")
    args = parser.parse_args()
    t_start = time.perf_counter()

    per_size, budgets = (1, (1, 4)) if args.quick else (args.per_size, (1, 2, 4, 8, 16, 32))
    sizes = (2, 3, 4)
    held_out = [p for size in sizes for p in problems(HELDOUT_SEED + size, per_size, (size,))]

    lm = load_default()
    delimiter = lm.tokenizer.encode(".")
    verifiers = {
        "exact": (rs.arithmetic_prm, rs.arithmetic_orm),
        "noisy": (
            rs.noisy(rs.arithmetic_prm, NOISE_RATE, seed=1),
            rs.noisy(rs.arithmetic_orm, NOISE_RATE, seed=2),
        ),
    }
    names = list(algorithms(1, *verifiers["exact"]))
    correct = {(v, a): np.zeros((len(budgets), len(held_out))) for v in verifiers for a in names}
    tokens = {(v, a): [] for v in verifiers for a in names}
    calls = {(v, a): [] for v in verifiers for a in names}

    for v, (prm, orm) in verifiers.items():
        spec = rs.StepSpec(
            decode=lm.tokenizer.decode,
            delimiters=tuple(delimiter),
            eos_id=lm.eos_id,
            max_chunk=16,
            max_steps=6,
            prm=prm,
        )
        program = rs.reasoning_program(spec)
        for j, problem in enumerate(held_out):
            q_args = rs.question_args(lm, spec, "<|endoftext|>" + problem.question, pad_to=PAD_TO)
            truth = problem.solve()[1]
            for b, n in enumerate(budgets):
                for name, alg in algorithms(n, prm, orm).items():
                    result = pp.infer(program, q_args, algorithm=alg, key=1000 * j + n)
                    correct[v, name][b, j] = result.extras["answer"] == truth
                    if n == budgets[-1]:
                        tokens[v, name].append(result.extras["generated_tokens"])
                        calls[v, name].append(result.extras["reward_calls"])
            print(f"  [{v}] problem {j + 1}/{len(held_out)} done ({time.perf_counter() - t_start:.0f} s)")

    acc = {k: c.mean(axis=1) for k, c in correct.items()}
    header = f"{'verifier':8} {'algorithm':10} " + " ".join(f"N={n:<4}" for n in budgets)
    header += f" {'tokens@max':>10} {'rewards@max':>11}"
    print(f"\naccuracy on {len(held_out)} held-out problems (sizes {sizes}, seed {HELDOUT_SEED})")
    print(header)
    for (v, a), values in acc.items():
        row = " ".join(f"{x:<6.2f}" for x in values)
        print(f"{v:8} {a:10} {row} {np.mean(tokens[v, a]):>10.0f} {np.mean(calls[v, a]):>11.1f}")

    print("\nscaling rate: smallest budget reaching an accuracy (— never, within the budgets)")
    print(f"{'verifier':8} {'algorithm':10} " + " ".join(f"acc>={t:<5}" for t in TARGETS))
    for (v, a), values in acc.items():
        print(f"{v:8} {a:10} " + " ".join(f"{budget_to_reach(values, budgets, t):<10}" for t in TARGETS))

    plot(acc, budgets, Path(ROOT / "out" / "reasoning_scaling.png"))
    print(f"plot: out/reasoning_scaling.png; wall time {time.perf_counter() - t_start:.0f} s")
    print(
        f"RESULT pf_acc_at_max={acc['exact', 'pf'][-1]:.3f} "
        f"best_of_n_acc_at_max={acc['exact', 'bon_orm'][-1]:.3f} "
        f"beam_acc_at_max={acc['exact', 'beam'][-1]:.3f}"
    )


def budget_to_reach(values: np.ndarray, budgets: tuple, target: float) -> str:
    """The smallest budget whose accuracy is at least ``target`` ("—" if none)."""
    reached = [n for n, x in zip(budgets, values, strict=True) if x >= target - 1e-9]
    return str(reached[0]) if reached else "—"


def plot(acc: dict, budgets: tuple, path: Path) -> None:
    """Accuracy vs budget, one panel per verifier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verifiers = sorted({v for v, _ in acc})
    fig, axes = plt.subplots(1, len(verifiers), figsize=(6 * len(verifiers), 4.2), sharey=True)
    for ax, v in zip(np.atleast_1d(axes), verifiers, strict=True):
        for (vv, a), values in acc.items():
            if vv == v:
                ax.plot(budgets, values, marker="o", label=a)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (particles / samples)")
        ax.set_title(f"{v} verifier")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    np.atleast_1d(axes)[-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
