"""Inference-time scaling as inference: accuracy vs budget on held-out synthetic arithmetic.

Every algorithm of :mod:`ppinfer.reasoning` runs on the embedded default LM for held-out problems of
graded difficulty (2, 3 and 4 operands, equally many of each), at budgets of 1, 2, 4, … 64
trajectories, once with the exact verifiers (arithmetic PRM; gold-answer ORM) and once with noisy
ones (each score flipped at rate 0.2). A problem counts as solved when the algorithm's answer equals
the true value. Prints the accuracy table (each entry ± its binomial standard error
``sqrt(p(1−p)/n)``), the scaling rates, the compute accounting; writes ``out/reasoning_scaling.png``
and ends with a ``RESULT`` line.

Held-out problems: ``models.arith_corpus.problems(2026 + size, …)``. The default LM's training
(``models/train_default_lm.py``, ``SEED = 0``) drew its problems with seeds 0 (training), 1 (held-out
loss), 2 (choice of the accuracy set) and 5–8 (accuracy set). On top of the unused seed, a 3- or
4-operand expression that occurs among the 80 000 training problems is dropped, as are duplicates;
2-operand problems cannot be unseen (all 810 such expressions occur in training) and are held out
by seed only.

Algorithms (budget ``B`` = trajectories; the compute accounting of each is in the table):

- ``sampling``: one sample's answer; ``vote``: majority vote of B samples; ``vote_prm``: votes
  weighted by the PRM score of each full solution; ``bon_prm``: best-of-B scored by the PRM of the
  full solution (the verifier the filters use: this is the ``bon`` of the RESULT line);
  ``bon_orm``: best-of-B with the ORM — with the exact ORM an oracle (pass@B), an upper bound.
  These five are computed from ONE pool of 64 samples per problem: a particle's trajectory depends
  only on the key and its index, not on N (``tests/test_reasoning_gibbs.py`` checks it), so the
  first B samples of the pool are exactly what ``BestOfN(B)``/``MajorityVote(B)`` with that key
  draw; their answers are picked with the same rules (``rs.weighted_vote``, first argmax) and
  their token and reward counts are those the classes report.
- ``pf`` (Puri et al.'s particle filter, weighted vote), ``pf_argmax`` (the same run: the same
  particles, answer of the highest-scored particle), ``fk`` (Feynman–Kac filter, ESS-adaptive,
  weighted vote), ``beam`` (step-level beam search, expand 4), ``pg`` (particle Gibbs, Feynman–Kac
  weights, N·M = B: ``M = min(4, B/2)`` sweeps of ``N = B/M`` particles, ``M = 1`` for B ≤ 2).

Scaling rate, as Puri et al. report it: the budget a method needs to reach a target accuracy, the
accuracy curve interpolated linearly in log2(budget) between grid points, the first crossing.
A method that never reaches the target within 64 is *censored*: its budget is reported as "> 64"
and a ratio involving it as a lower bound. The RESULT line's ``budget_ratio_beam_over_pf`` is
beam's budget / PF's budget to reach the target ``a* = PF's accuracy at budget 4`` (exact verifier);
censored, it is 64 / PF's budget (a lower bound, flagged in the printout).

    .venv/bin/python benchmarks/bench_reasoning_scaling.py                 # 8 problems per size (24)
    .venv/bin/python benchmarks/bench_reasoning_scaling.py --per-size 10 --resume   # add to the log
    .venv/bin/python benchmarks/bench_reasoning_scaling.py --per-size 10 --report   # table from the log
    .venv/bin/python benchmarks/bench_reasoning_scaling.py --quick         # 1 problem, budget 4

Problems are interleaved by size and a problem's keys depend only on its position, so a
``--per-size 4`` run followed by ``--per-size 10 --resume`` gives the figures of one
``--per-size 10`` run. On the shared 2-core machine (load average ~20) a problem costs 30–100 s
wall (~110 s with the 64-particle runs of a 4-operand problem), and every fresh process first pays
~27 compilations (one SMC loop per algorithm and particle count, ~4–6 s each on an idle core; host
callbacks keep them out of JAX's persistent cache). With the 13 of an earlier version (one loop
shared by pf, fk and beam, ~7 min in all under that load) the default 24 problems took about 25
minutes there. The exact and the noisy verifier share compiled
loops: the PRM is one :class:`Switch` object whose current verifier is chosen between runs (it is
called from the host).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

import ppinfer as pp  # noqa: E402
from models.arith_corpus import problems  # noqa: E402
from ppinfer import reasoning as rs  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402

HELDOUT_SEED = 2026
TRAIN_SEED, NUM_TRAIN, TRAIN_SIZES = 0, 80_000, (2, 3, 4, 5)  # as models/train_default_lm.py
SIZES = (2, 3, 4)
NOISE_RATE = 0.2
PAD_TO = 24
BUDGETS = (1, 2, 4, 8, 16, 32, 64)
POOLED = ("sampling", "vote", "vote_prm", "bon_prm", "bon_orm")
STEPWISE = ("pf", "pf_argmax", "fk", "beam", "pg")
NAMES = POOLED + STEPWISE
FIXED_TARGETS = (0.25, 0.5)
DEFAULT_OUT = str(ROOT / "out" / "reasoning_scaling.png")


class Switch:
    """A reward that delegates to ``self.current`` (set between runs), so that runs with different
    verifiers share one compiled step loop (the reward is called from the host)."""

    def __init__(self, current):
        self.current = current

    def __call__(self, question: str, solution: str) -> float:
        return self.current(question, solution)


def held_out_problems(per_size: int) -> list:
    """``per_size`` distinct problems of each size in SIZES, interleaved by size (2, 3, 4, 2, 3, 4,
    …) so that any prefix of the run stays graded. From size 3 on, no expression was trained on;
    every 2-operand expression occurs in the training set (the space, 810 expressions, is
    exhausted by 80 000 training problems), so size 2 is held out by seed only."""
    trained = {p.expression for p in problems(TRAIN_SEED, NUM_TRAIN, TRAIN_SIZES)}
    seen, by_size = set(), []
    for size in SIZES:
        fresh = []
        for p in problems(HELDOUT_SEED + size, 50 * per_size, (size,)):
            if p.expression not in seen and (size == 2 or p.expression not in trained):
                seen.add(p.expression)
                fresh.append(p)
            if len(fresh) == per_size:
                break
        by_size.append(fresh)
    return [p for group in zip(*by_size, strict=True) for p in group]


def pg_shape(budget: int) -> tuple[int, int]:
    """(particles, sweeps) of particle Gibbs at ``budget`` = particles · sweeps."""
    sweeps = 1 if budget <= 2 else min(4, budget // 2)
    return budget // sweeps, sweeps


def stepwise_algorithms(n: int) -> dict:
    particles, sweeps = pg_shape(n)
    return {
        "pf": rs.ParticleFilter(n, answer="vote"),
        "fk": rs.FeynmanKacFilter(n, answer="vote"),
        "beam": rs.BeamSearch(n, expand=4),
        "pg": rs.ParticleGibbs(particles, sweeps, answer="vote"),
    }


def pooled(pool: dict, n: int, prm, orm) -> dict:
    """The sample-based methods on the first ``n`` samples of the pool: {name: (answer, tokens,
    reward_calls)} with the rules and accounting of Sampling / MajorityVote / BestOfN."""
    q, sols, answers = pool["question"], pool["solutions"][:n], pool["answers"][:n]
    tokens = int(np.sum(pool["lengths"][:n]))
    prm_scores = np.asarray([prm(q, s) for s in sols], np.float64)
    orm_scores = np.asarray([orm(q, s) for s in sols], np.float64)
    with np.errstate(divide="ignore"):
        log_prm = np.log(prm_scores)
    return {
        "sampling": (answers[0], int(pool["lengths"][0]) if n else 0, 0),
        "vote": (rs.weighted_vote(answers, np.zeros(n))[0], tokens, 0),
        "vote_prm": (rs.weighted_vote(answers, log_prm)[0], tokens, n),
        "bon_prm": (answers[int(np.argmax(prm_scores))], tokens, n),
        "bon_orm": (answers[int(np.argmax(orm_scores))], tokens, n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 problem (size 3), budget 4")
    parser.add_argument("--per-size", type=int, default=8, help="problems per size (full run)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the plot; the per-problem log is its .jsonl")
    parser.add_argument(
        "--resume", action="store_true", help="keep the problems already in the .jsonl log, run the rest"
    )
    parser.add_argument(
        "--report", action="store_true", help="only report the problems already in the .jsonl log"
    )
    args = parser.parse_args()
    t_start = time.perf_counter()
    budgets = (4,) if args.quick else BUDGETS
    if args.quick:
        held_out = [p for p in held_out_problems(1) if p.size == 3]
        if args.out == DEFAULT_OUT:
            args.out = str(ROOT / "out" / "reasoning_scaling_quick.png")
    else:
        held_out = held_out_problems(args.per_size)
    log = Path(args.out).with_suffix(".jsonl")
    done = load_log(log, budgets) if (args.resume or args.report) else {}
    if not (args.resume or args.report):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
    if not args.report:
        run(held_out, budgets, done, log, t_start)
        done = load_log(log, budgets)
    records = [done[p.expression] for p in held_out if p.expression in done]
    if not records:
        print("no finished problem to report")
        return
    acc, tokens, calls = tables(records, budgets)
    report(acc, tokens, calls, budgets, [r["size"] for r in records])
    plot(acc, len(records), budgets, Path(args.out))
    shown = Path(args.out).relative_to(ROOT) if Path(args.out).is_relative_to(ROOT) else args.out
    print(f"plot: {shown}; per-problem log: {log.name}; wall time {time.perf_counter() - t_start:.0f} s")
    result_line(acc, budgets)


def run(held_out: list, budgets: tuple, done: dict, log: Path, t_start: float) -> None:
    """Run every algorithm on the problems not in ``done``; append one JSON line per problem."""
    lm = load_default()
    prm, orm = Switch(rs.arithmetic_prm), Switch(rs.arithmetic_orm)
    verifiers = {
        "exact": (rs.arithmetic_prm, rs.arithmetic_orm),
        "noisy": (
            rs.noisy(rs.arithmetic_prm, NOISE_RATE, seed=1),
            rs.noisy(rs.arithmetic_orm, NOISE_RATE, seed=2),
        ),
    }
    spec = rs.StepSpec(
        decode=lm.tokenizer.decode,
        delimiters=tuple(lm.tokenizer.encode(".")),
        eos_id=lm.eos_id,
        max_chunk=12,
        max_steps=5,
        prm=prm,
    )
    program = rs.reasoning_program(spec)
    for j, problem in enumerate(held_out):
        if problem.expression in done:
            continue
        q_args = rs.question_args(lm, spec, "<|endoftext|>" + problem.question, pad_to=PAD_TO)
        truth = problem.solve()[1]
        pool_run = pp.infer(program, q_args, algorithm=rs.Sampling(max(budgets)), key=1000 * j + 999)
        pool = dict(pool_run.extras, lengths=np.asarray(pool_run.samples["length"]))
        record = {"expression": problem.expression, "size": problem.size, "truth": truth,
                  "budgets": list(budgets), "results": {}}
        for v, (prm_v, orm_v) in verifiers.items():
            prm.current, orm.current = prm_v, orm_v
            rows = {name: [] for name in NAMES}
            for n in budgets:
                results = {}
                for name, alg in stepwise_algorithms(n).items():
                    r = pp.infer(program, q_args, algorithm=alg, key=1000 * j + n)
                    ex = r.extras
                    results[name] = (ex["answer"], ex["generated_tokens"], ex["reward_calls"])
                    if name == "pf":
                        results["pf_argmax"] = pf_argmax(r)
                results.update(pooled(pool, n, prm_v, orm_v))
                for name, (answer, tok, cal) in results.items():
                    rows[name].append([int(answer == truth), int(tok), int(cal)])
            record["results"][v] = rows
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        elapsed = time.perf_counter() - t_start
        print(f"  problem {j + 1}/{len(held_out)} (size {problem.size}) done ({elapsed:.0f} s)", flush=True)


def load_log(log: Path, budgets: tuple) -> dict:
    """{expression: record} of the problems in the log run with these budgets."""
    if not log.exists():
        return {}
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["expression"]: r for r in records if tuple(r["budgets"]) == tuple(budgets)}


def tables(records: list, budgets: tuple) -> tuple[dict, dict, dict]:
    """Accuracy ``f[B]`` and per-problem tokens and reward calls ``f[B, P]`` per (verifier, name)."""
    acc, tokens, calls = {}, {}, {}
    for v in ("exact", "noisy"):
        for name in NAMES:
            rows = np.asarray([r["results"][v][name] for r in records], np.float64)  # [P, B, 3]
            acc[v, name] = rows[:, :, 0].mean(axis=0)
            tokens[v, name], calls[v, name] = rows[:, :, 1].T, rows[:, :, 2].T
    return acc, tokens, calls


def pf_argmax(r) -> tuple:
    """``pf_argmax`` from the PF run: the answer of the particle with the highest final score (ties:
    the lowest index) — exactly ``ParticleFilter(answer="argmax")`` with the same key."""
    best = int(np.argmax(np.asarray(r.samples["score"])))
    return r.extras["answers"][best], r.extras["generated_tokens"], r.extras["reward_calls"]


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def budget_to_reach(values, budgets, target: float) -> float:
    """The first budget at which the accuracy curve, linear in log2(budget) between grid points,
    reaches ``target``; ``inf`` if it never does (censored)."""
    values, logs = np.asarray(values, np.float64), np.log2(np.asarray(budgets, np.float64))
    if values[0] >= target - 1e-12:
        return float(budgets[0])
    for i in range(1, len(values)):
        if values[i] >= target - 1e-12:
            lo, hi = values[i - 1], values[i]
            frac = (target - lo) / (hi - lo)
            return float(2.0 ** (logs[i - 1] + frac * (logs[i] - logs[i - 1])))
    return math.inf


def fmt_budget(b: float) -> str:
    return f"> {BUDGETS[-1]}" if math.isinf(b) else f"{b:.1f}"


def report(acc, tokens, calls, budgets, sizes_run) -> None:
    num = len(sizes_run)
    counts = ", ".join(f"{sizes_run.count(s)} of size {s}" for s in sorted(set(sizes_run)))
    print(f"\naccuracy on {num} held-out problems ({counts}; seeds {HELDOUT_SEED}+size) ± binomial SE")
    head = f"{'verifier':8} {'algorithm':10} " + " ".join(f"{'B=' + str(n):>10}" for n in budgets)
    print(head + f" {'tokens@max':>10} {'rewards@max':>11}")
    for (v, a), values in acc.items():
        cells = " ".join(f"{x:5.2f}±{standard_error(x, num):4.2f}" for x in values)
        print(f"{v:8} {a:10} {cells} {tokens[v, a][-1].mean():>10.0f} {calls[v, a][-1].mean():>11.1f}")

    if len(budgets) < 3:
        return
    print("\nscaling rate: budget needed to reach a target accuracy (log2-linear interpolation; "
          "> 64 = never reached: censored)")
    for v in ("exact", "noisy"):
        a_star = acc[v, "pf"][budgets.index(4)]
        targets = (a_star, *FIXED_TARGETS)
        print(f"[{v}] targets: PF's accuracy at B=4 ({a_star:.2f}), " + ", ".join(map(str, FIXED_TARGETS)))
        print(f"{'algorithm':10} " + " ".join(f"{'acc>=' + format(t, '.2f'):>10}" for t in targets)
              + f" {'ratio/PF @a*':>13}")
        pf_budget = budget_to_reach(acc[v, "pf"], budgets, a_star)
        for a in NAMES:
            needed = [budget_to_reach(acc[v, a], budgets, t) for t in targets]
            ratio = needed[0] / pf_budget
            ratio_s = f"≥ {BUDGETS[-1] / pf_budget:.1f}" if math.isinf(ratio) else f"{ratio:.2f}"
            print(f"{a:10} " + " ".join(f"{fmt_budget(b):>10}" for b in needed) + f" {ratio_s:>13}")


def result_line(acc, budgets) -> None:
    if 16 in budgets:
        i16 = budgets.index(16)
        pf16, bon16, beam16 = (acc["exact", k][i16] for k in ("pf", "bon_prm", "beam"))
    else:  # --quick: the largest budget run stands in
        pf16, bon16, beam16 = (acc["exact", k][-1] for k in ("pf", "bon_prm", "beam"))
    if 4 in budgets and len(budgets) >= 3:
        a_star = acc["exact", "pf"][budgets.index(4)]
        pf_b = budget_to_reach(acc["exact", "pf"], budgets, a_star)
        beam_b = budget_to_reach(acc["exact", "beam"], budgets, a_star)
        censored = math.isinf(beam_b)
        ratio = (budgets[-1] if censored else beam_b) / pf_b
        print(
            f"budget ratio beam/PF to reach a* = PF's exact-verifier accuracy at B=4 ({a_star:.3f}): "
            f"PF {pf_b:.1f}, beam {fmt_budget(beam_b)}"
            + (" (censored: the ratio is a lower bound)" if censored else "")
        )
    else:
        ratio = float("nan")
    print(
        f"RESULT pf_acc_at_16={pf16:.3f} bon_acc_at_16={bon16:.3f} beam_acc_at_16={beam16:.3f} "
        f"budget_ratio_beam_over_pf={ratio:.2f}"
    )


STYLE = {
    "sampling": ("0.6", ":"), "vote": ("tab:olive", "--"), "vote_prm": ("tab:green", "--"),
    "bon_prm": ("tab:orange", "-"), "bon_orm": ("0.3", ":"), "pf": ("tab:blue", "-"),
    "pf_argmax": ("tab:cyan", "-."), "fk": ("tab:purple", "-"), "beam": ("tab:red", "-"),
    "pg": ("tab:brown", "-"),
}


def plot(acc: dict, num: int, budgets: tuple, path: Path) -> None:
    """Accuracy vs budget with ±1 standard error bars, one panel per verifier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verifiers = ("exact", "noisy")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    for ax, v in zip(axes, verifiers, strict=True):
        for a in NAMES:
            values = acc[v, a]
            err = [standard_error(x, num) for x in values]
            color, line = STYLE[a]
            label = a + (" (oracle)" if a == "bon_orm" and v == "exact" else "")
            ax.errorbar(budgets, values, yerr=err, color=color, linestyle=line, marker="o", ms=3,
                        capsize=2, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("budget (trajectories: particles × sweeps / samples)")
        ax.set_title(f"{v} verifier ({num} held-out problems)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
