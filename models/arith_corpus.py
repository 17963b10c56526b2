"""Synthetic step-by-step arithmetic problems for the default LM (generated, never downloaded).

One problem per document::

    Q: 17+5*3 = ? Step: 5*3=15. Step: 17+15=32. A: 32

Multiplications are worked first, left to right, then additions and subtractions left to right;
one ``Step`` per operator. The problem size is the number of operands.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPERATORS = ("+", "-", "*")


@dataclass(frozen=True)
class Problem:
    """An expression over ``operands`` with its worked ``steps`` and integer ``answer``."""

    operands: tuple[int, ...]
    operators: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.operands)

    @property
    def expression(self) -> str:
        parts = [str(self.operands[0])]
        for op, value in zip(self.operators, self.operands[1:], strict=True):
            parts += [op, str(value)]
        return "".join(parts)

    @property
    def question(self) -> str:
        """The prompt: everything up to the first step."""
        return f"Q: {self.expression} = ?"

    def solve(self) -> tuple[list[str], int]:
        """The worked steps (``a*b=c``) and the answer."""
        values, ops, steps = list(self.operands), list(self.operators), []
        for kinds in (("*",), ("+", "-")):
            i = 0
            while i < len(ops):
                if ops[i] not in kinds:
                    i += 1
                    continue
                a, b = values[i], values[i + 1]
                c = a * b if ops[i] == "*" else a + b if ops[i] == "+" else a - b
                steps.append(f"{a}{ops[i]}{b}={c}")
                values[i : i + 2] = [c]
                del ops[i]
        return steps, values[0]

    @property
    def text(self) -> str:
        steps, answer = self.solve()
        worked = " ".join(f"Step: {step}." for step in steps)
        return f"{self.question} {worked} A: {answer}"


MAX_OPERAND = 19


def random_problem(rng: random.Random, size: int) -> Problem:
    """A problem of ``size`` operands in 0..19; a right-hand factor of ``*`` is a single digit
    ≥ 2. Small operands keep the one-step facts few enough for a tiny model to learn them."""
    operators = tuple(rng.choice(OPERATORS) for _ in range(size - 1))
    operands = [rng.randint(0, MAX_OPERAND)]
    for op in operators:
        operands.append(rng.randint(2, 9) if op == "*" else rng.randint(0, MAX_OPERAND))
    return Problem(tuple(operands), operators)


def problems(seed: int, count: int, sizes: tuple[int, ...] = (2, 3, 4, 5)) -> list[Problem]:
    """``count`` problems with sizes drawn uniformly from ``sizes`` (seeded, reproducible)."""
    rng = random.Random(seed)
    return [random_problem(rng, rng.choice(sizes)) for _ in range(count)]


def parse_answer(completion: str) -> int | None:
    """The integer after ``A:`` in a model completion, or None when it is malformed."""
    _, marker, rest = completion.partition("A:")
    token = rest.strip().split(" ")[0] if marker else ""
    try:
        return int(token)
    except ValueError:
        return None
