"""Rewards of ppinfer.reasoning on hand-written texts: the exact arithmetic PRM and ORM, and the
noisy verifier's flip rate."""

import random

import numpy as np
import pytest

from models.arith_corpus import problems
from ppinfer import reasoning as rs
from ppinfer.errors import ConfigError, ModelError

Q = "Q: 17+5*3 = ?"


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("", 1.0),
        (" Step: 5*3=15. Step: 17+15=32. A: 32", 1.0),
        (" Step: 5*3=15. Step: 17+1", 1.0),  # an unfinished step is not judged yet
        (" Step: 5*3=15", 1.0),
        (" Step: 10-18=-8.", 1.0),
        (" Step: -1+9=8. Step: 8*2=16.", 1.0),
        (" Step: 5*3=15. Step: 17+15=33. A: 33", 0.0),  # wrong arithmetic
        (" Step: 3*9=112.", 0.0),
        (" Step: 5*3=15. A: 16", 0.0),  # the answer is not the last step's result
        (" A: 32", 0.0),  # an answer without steps
        (" Step: 5*3=15. A:", 0.0),  # no number after A:
        (" Step: x.", 0.0),  # malformed step
        (" Step: 5*3=15 Step: 1+1=2.", 0.0),  # a step that was never closed
        ("garbage Step: 1+1=2.", 0.0),
    ],
)
def test_arithmetic_prm(solution, expected):
    assert rs.arithmetic_prm(Q, solution) == expected


def test_arithmetic_orm_and_expected_answer():
    assert rs.arithmetic_orm(Q, " Step: 5*3=15. Step: 17+15=32. A: 32") == 1.0
    assert rs.arithmetic_orm(Q, " Step: 5*3=15. Step: 17+15=33. A: 33") == 0.0
    assert rs.arithmetic_orm(Q, " Step: 5*3=15.") == 0.0
    assert rs.arithmetic_orm("no question here", " A: 3") == 0.0
    assert rs.expected_answer("<|endoftext|>Q: 9+3*9-15 = ?") == 21
    for p in problems(123, 200):
        assert rs.expected_answer(p.question) == p.solve()[1]
        # the corpus' own worked solutions pass the PRM and the ORM
        solution = p.text[len(p.question) :]
        assert rs.arithmetic_prm(p.question, solution) == 1.0
        assert rs.arithmetic_orm(p.question, solution) == 1.0


def test_parse_answer():
    assert rs.parse_answer(" Step: 1+1=2. A: 2") == 2
    assert rs.parse_answer(" A: -11") == -11
    assert rs.parse_answer(" Step: 1+1=2.") is None
    assert rs.parse_answer(" A: x") is None


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_noisy_reward_flips_at_rate(rate):
    noisy = rs.noisy(rs.arithmetic_prm, rate, seed=3)
    rng = random.Random(0)
    texts = [f" Step: {rng.randint(0, 99)}+{i}={rng.randint(0, 200)}." for i in range(4000)]
    exact = np.array([rs.arithmetic_prm(Q, t) for t in texts])
    got = np.array([noisy(Q, t) for t in texts])
    flipped = got != exact
    assert np.all(got == np.where(flipped, 1.0 - exact, exact))
    # binomial(4000, rate): 5 standard deviations
    assert abs(flipped.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / len(texts)) + 1e-12
    # deterministic: the same text always gets the same score
    assert all(noisy(Q, t) == g for t, g in zip(texts[:50], got[:50], strict=True))


def test_noisy_seeds_differ():
    a, b = rs.noisy(rs.arithmetic_prm, 0.5, seed=0), rs.noisy(rs.arithmetic_prm, 0.5, seed=1)
    texts = [f" Step: 1+{i}={i + 1}." for i in range(200)]
    assert [a(Q, t) for t in texts] != [b(Q, t) for t in texts]


def test_reward_errors():
    with pytest.raises(ConfigError):
        rs.noisy(rs.arithmetic_prm, 1.5)
    with pytest.raises(ConfigError):
        rs.noisy("not a function", 0.1)
    with pytest.raises(ModelError, match=r"\[0, 1\]"):
        rs.check_reward(lambda q, s: 2.0, "process reward")
    with pytest.raises(ModelError, match="failed"):
        rs.check_reward(lambda q, s: 1 / 0, "process reward")
    rs.check_reward(rs.arithmetic_prm, "process reward")


def test_weighted_vote():
    answer, tally = rs.weighted_vote([1, 2, 2, None], np.log([0.9, 0.5, 0.5, 5.0]))
    assert answer == 2 and tally == pytest.approx({1: 0.9 / 6.9, 2: 1.0 / 6.9})  # shares of all votes
    assert rs.weighted_vote([None, None], [0.0, 0.0])[0] is None


def test_the_probe_and_the_run_accept_the_same_round_off():
    """1 + 1e-7 (a probability with round-off) passed mid-run but was refused by the probe."""
    from ppinfer.reasoning import check_reward, score

    reward = lambda question, solution: 1 + 1e-7
    check_reward(reward, "vote reward")
    assert score(reward, "vote reward", "q", "s") == 1.0
    with pytest.raises(ModelError, match=r"a reward is a number in \[0, 1\]"):
        check_reward(lambda question, solution: 1.01, "vote reward")
