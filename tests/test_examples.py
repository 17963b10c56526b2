"""The examples, the tutorial and the demo run (small sizes where they take arguments)."""

import importlib.util
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_state_space_proposal(capsys):
    load(ROOT / "examples" / "state_space_proposal.py").main(num_particles=200, num_steps=20)
    out = capsys.readouterr().out
    assert "bootstrap" in out and "locally optimal" in out


def test_conjugate_importance(capsys):
    load(ROOT / "examples" / "conjugate_importance.py").main(num_particles=500)
    assert "E[p]" in capsys.readouterr().out


def test_validate_your_blocks(capsys):
    load(ROOT / "examples" / "validate_your_blocks.py").main()
    out = capsys.readouterr().out
    assert "invalid" in out and "SMC (N=2, T=2" in out


def test_tutorial_runs(capsys):
    runpy.run_path(str(ROOT / "docs" / "tutorials" / "smc_hmm.py"), run_name="__main__")
    assert "log Z: SMC" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs(tmp_path, monkeypatch, capsys):
    demo = load(ROOT / "ppinfer" / "demo.py")
    monkeypatch.setattr(demo, "REPO", tmp_path)
    demo.main()
    assert (tmp_path / "out" / "demo.png").exists()
    assert "exact (Kalman)" in capsys.readouterr().out


def test_regex_constraint_example(capsys):
    load(ROOT / "examples" / "regex_constraint.py").main(num_particles=16, max_new_tokens=12)
    assert "locally constrained SMC" in capsys.readouterr().out


def test_infill_suffix_example(capsys):
    load(ROOT / "examples" / "infill_suffix.py").main(num_particles=8, max_steps_tokens=8)
    assert "conditioned on the answer" in capsys.readouterr().out


def test_critic_potential_example(capsys):
    load(ROOT / "examples" / "critic_potential.py").main(num_particles=8, max_new_tokens=6)
    assert "twist= True" in capsys.readouterr().out


def test_learned_token_twist_example(capsys):
    load(ROOT / "examples" / "learned_token_twist.py").main(
        num_particles=8, max_new_tokens=8, num_iterations=2, num_runs=2
    )
    assert "learned twist" in capsys.readouterr().out
