"""Sphinx configuration. Tutorials are Python scripts executed when the docs build: their output is
captured into ``tutorials/_generated/`` and shown next to the code, so a broken tutorial fails the
build (``make docs`` runs Sphinx with ``-W``)."""

import contextlib
import io
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

project = "ppinfer"
author = "the ppinfer developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "tutorials/_generated"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_use_ivar = True
html_theme = "alabaster"
suppress_warnings = ["myst.header"]


def _run_tutorials() -> None:
    out_dir = HERE / "tutorials" / "_generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    for script in sorted((HERE / "tutorials").glob("*.py")):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            runpy.run_path(str(script), run_name="__main__")
        (out_dir / f"{script.stem}.out.txt").write_text(buffer.getvalue())


_run_tutorials()
