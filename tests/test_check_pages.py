"""docs/check_pages.py, the browser check of the built docs, on a tiny site: it passes a clean page and
fails a page with raw TeX and a page with a horizontally overflowing code block (headless Chromium)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("websocket")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
if shutil.which(CHROMIUM) is None:
    pytest.skip(f"no browser at {CHROMIUM}", allow_module_level=True)

_spec = importlib.util.spec_from_file_location(
    "check_pages", Path(__file__).resolve().parents[1] / "docs" / "check_pages.py"
)
check_pages = importlib.util.module_from_spec(_spec)
sys.modules["check_pages"] = check_pages  # dataclasses look their module up there
_spec.loader.exec_module(check_pages)

PAGE = (
    "<!doctype html><html><head><style>pre {{ width: 300px; overflow: auto; }}</style></head>"
    "<body><article><p>{text}</p><pre>{code}</pre></article></body></html>"
)


def test_raw_tex_patterns():
    assert check_pages.raw_tex(r"the weight $\frac{p}{q}$ of a run")
    assert check_pages.raw_tex(r"an estimate \(\hat Z\) of Z")
    assert check_pages.raw_tex(r"where $x_t$ is the state")
    assert not check_pages.raw_tex("it costs $5 and $10 on a weekday")  # prose dollars are not TeX
    assert not check_pages.raw_tex("E[Ẑ] = Z and log p/q")


def test_clean_page_passes_and_broken_pages_fail(tmp_path, capsys):
    site = tmp_path / "html"
    site.mkdir()
    (site / "index.html").write_text(PAGE.format(text="A weighted particle.", code="x = 1"))
    (site / "tex.html").write_text(PAGE.format(text=r"The weight is $\frac{p}{q}$.", code="x = 1"))
    (site / "wide.html").write_text(PAGE.format(text="Fine prose.", code="y = " + "1 + " * 120 + "1"))
    shots = tmp_path / "shots"
    code = check_pages.main([str(site), "--screenshots", str(shots)])
    out = capsys.readouterr().out
    assert code == 1, out
    lines = {
        w: line
        for line in out.splitlines()
        if line.startswith("[")
        for w in line.split()
        if w.endswith(".html")
    }
    assert "ok" in lines["index.html"] and "raw TeX 0" in lines["index.html"]
    assert "FAIL" in lines["tex.html"] and "raw TeX 0" not in lines["tex.html"]
    assert "FAIL" in lines["wide.html"] and "overflowing 1" in lines["wide.html"]
    assert sorted(p.name for p in shots.iterdir()) == ["index.png", "tex.png", "wide.png"]
    assert all(p.stat().st_size > 1000 for p in shots.iterdir())


def _mathjax_dir() -> Path | None:
    spec = importlib.util.find_spec("sphinx-mathjax-offline")  # the docs extra's bundled MathJax 3
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "static" / "mathjax"
    return folder if (folder / "tex-chtml.js").is_file() else None


MATH_PAGE = (
    "<!doctype html><html><head><script>window.MathJax = {{tex: {{macros: {{ok: '\\\\mathbb{{E}}'}}}}}};"
    "</script><script src='mathjax/tex-chtml.js'></script></head>"
    "<body><article><p>Weight <span class='math'>\\({formula}\\)</span>.</p></article></body></html>"
)


def test_typeset_math_passes_and_an_undefined_macro_fails(tmp_path, capsys):
    mathjax = _mathjax_dir()
    if mathjax is None:
        pytest.skip("sphinx-mathjax-offline (the docs extra) is not installed")
    site = tmp_path / "html"
    site.mkdir()
    (site / "mathjax").symlink_to(mathjax)
    (site / "index.html").write_text(PAGE.format(text="Index.", code="x = 1"))
    (site / "good.html").write_text(MATH_PAGE.format(formula=r"\ok[\hat Z] = \frac{p}{q}"))
    (site / "undefined.html").write_text(MATH_PAGE.format(formula=r"\llbracket p \rrbracket"))
    code = check_pages.main([str(site), "--pages", "good.html", "undefined.html"])
    out = capsys.readouterr().out
    assert code == 1, out
    lines = {
        w: line
        for line in out.splitlines()
        if line.startswith("[")
        for w in line.split()
        if w.endswith(".html")
    }
    assert "ok" in lines["good.html"] and "math   1" in lines["good.html"], out
    assert "FAIL" in lines["undefined.html"] and "MathJax errors" in lines["undefined.html"], out
