"""``Result.to_html``: the page's data agree with the run, and the page renders in headless Chromium
without script errors, showing one row per particle."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

import ppinfer as pp
from ppinfer import tokens as tk
from ppinfer.errors import ConfigError
from ppinfer.html import smc_token_view
from ppinfer.lm import NGramLM

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
N, T = 12, 8


@pytest.fixture(scope="module")
def run():
    vocab = ["<s>", "a", "b", "c", " ", "</s>"]
    probs = np.random.default_rng(0).dirichlet(np.ones(6), size=6)
    lm = NGramLM.from_probs(probs, bos_id=0, eos_id=5, vocab=vocab)
    p = tk.prompt(lm, "", max_new_tokens=T)

    def step(ctx, t, p):
        tok = pp.sample("tok", ctx.next_token())
        pp.condition("no_c", tok != 3)
        pp.stop(tok == p.eos_id)
        return ctx.extend(p, tok)

    program = pp.sequential(tk.Context.start, step, T)
    result = pp.infer(program, p, algorithm=pp.SMC(N, ess_threshold=1.0), key=3)
    return lm, result


def test_view_matches_the_run(run):
    lm, result = run
    view = smc_token_view(result, lm.tokenizer)
    steps = view["steps"]
    assert view["num_particles"] == N and 1 <= view["num_steps"] <= T and len(steps) == view["num_steps"]
    assert any(view["resampled"]), "the fixture should resample at least once"
    anc = np.asarray(result.ancestors)
    for t, st in enumerate(steps):
        assert abs(sum(st["weights"]) - 1) < 1e-9 and len(st["texts"]) == N
        assert st["copies"] == np.bincount(anc[t], minlength=N).tolist() and sum(st["copies"]) == N
        if t:
            assert st["parents"] == anc[t - 1].tolist()
            prev = steps[t - 1]["texts"]
            # a particle's text is its parent's text plus the piece this step added
            assert all(
                text == prev[p] + piece
                for text, p, piece in zip(st["texts"], st["parents"], st["pieces"], strict=True)
            )
        # a text with a "c" breaks the condition: weight zero
        assert all(w == 0 for text, w in zip(st["texts"], st["weights"], strict=True) if "c" in text)
    final = tk.texts(result, lm.tokenizer, all_particles=True)
    assert [t for t, _ in final] == view["final"]["texts"]
    np.testing.assert_allclose([w for _, w in final], view["final"]["weights"], atol=1e-6)
    np.testing.assert_allclose(view["log_z"][-1], float(result.log_evidence), atol=1e-5)


def test_needs_tokens_and_history(run):
    lm, result = run
    with pytest.raises(ConfigError, match="tokenizer"):
        smc_token_view(result)  # not a constrained program: the tokenizer is needed
    with pytest.raises(ConfigError, match="no step site"):
        smc_token_view(result, lm.tokenizer, site="x")


def render(page: Path, tmp: Path) -> tuple[str, str]:
    """The DOM after the page's scripts ran, and Chromium's log (console messages included)."""
    profile = tempfile.mkdtemp(dir=tmp)
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout, out.stderr


def page_problems(dom: str, log: str, num_particles: int) -> list[str]:
    """What is wrong with a rendered page: not rendered, script errors, wrong number of rows."""
    problems = []
    if 'data-pp-status="rendered"' not in dom:
        problems.append("the page script did not finish")
    errors = re.findall(r'data-pp-errors="([^"]*)"', dom)
    errors += re.findall(r"CONSOLE.*?(Uncaught[^\n]*)", log)
    if errors:
        problems.append(f"script errors: {errors}")
    rows = len(re.findall(r'<tr class="particle', dom))
    if rows != num_particles:
        problems.append(f"{rows} particle rows, expected {num_particles}")
    return problems


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (/usr/bin/chromium) is not installed")
def test_page_renders_in_chromium(run, tmp_path):
    lm, result = run
    page = result.to_html(tmp_path / "run.html", lm.tokenizer)
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    dom, log = render(page, tmp_path)
    assert page_problems(dom, log, N) == []
    # the check fails on a broken page: a script error, and a page that shows too few rows
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("slider.max = T;", "slider.max = T; undefinedFunction();"))
    dom, log = render(broken, tmp_path)
    problems = page_problems(dom, log, N)
    assert any("undefinedFunction" in p for p in problems), problems
