"""Sphinx configuration.

Tutorials and how-to guides are MyST Markdown notebooks (``{code-cell}`` blocks) that myst-nb executes
when the docs build; a cell that raises fails the build (``make docs`` runs Sphinx with ``-W``).
Executed notebooks are cached in ``docs/_build/.jupyter_cache`` keyed by their code, so a rebuild
re-executes only the notebooks whose code changed. ``PPINFER_DOCS_EXECUTE=off`` builds without
executing anything (outputs left empty), for quick edits of the prose.
"""

import hashlib
import os
import shutil
import sys
from importlib.metadata import version as _installed_version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # autodoc documents this checkout's ppinfer and semantics

project = "ppinfer"
author = "the ppinfer developers"
copyright = "the ppinfer developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 served from _static/mathjax: the site needs no CDN
    "myst_nb",  # includes myst_parser; reads .md pages and executes the {code-cell} notebooks
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "tutorials/_generated", "**.ipynb_checkpoints"]
suppress_warnings = ["myst.header"]

# --- math: $…$, $$…$$ and \begin{align} in Markdown; :math: in reStructuredText; MathJax renders both.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_dmath_double_inline = True
myst_heading_anchors = 3
mathjax3_config = {
    "tex": {
        "macros": {  # the semantic brackets ⟦p⟧ (stmaryrd's commands, which MathJax lacks)
            "llbracket": "\\mathopen{[\\![}",
            "rrbracket": "\\mathclose{]\\!]}",
        }
    }
}

# --- notebooks: executed on the first build, then served from the cache until their code changes.
# jupyter-cache keys a notebook by its code cells only, so the cache folder is keyed by the library
# too: a change to ppinfer/, semantics/, the embedded model or the JAX/NumPyro versions re-executes
# every notebook (their printed outputs must come from the current code); folders of older keys are
# removed.


# The notebooks' kernels inherit this environment. tqdm.auto (imported by ppinfer) warns in a kernel
# without ipywidgets, printing the build machine's paths into every notebook: not for the reader.
_KERNEL_WARNINGS = "ignore:IProgress not found"
os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), _KERNEL_WARNINGS]))


def _library_key() -> str:
    digest = hashlib.sha256(_KERNEL_WARNINGS.encode())
    files = [*sorted((ROOT / "ppinfer").rglob("*.py")), *sorted((ROOT / "semantics").rglob("*.py"))]
    files += sorted((ROOT / "models" / "default_lm").glob("*"))
    for file in files:
        digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0" + file.read_bytes())
    for package in ("jax", "jaxlib", "numpyro"):
        digest.update(f"{package}=={_installed_version(package)}".encode())
    return digest.hexdigest()[:12]


_CACHE_ROOT = HERE / "_build" / ".jupyter_cache"
_CACHE = _CACHE_ROOT / _library_key()
if _CACHE_ROOT.is_dir():
    for old in _CACHE_ROOT.iterdir():
        if old.is_dir() and old != _CACHE:
            shutil.rmtree(old, ignore_errors=True)
nb_execution_mode = os.environ.get("PPINFER_DOCS_EXECUTE", "cache")
nb_execution_cache_path = str(_CACHE)
print(
    f"docs: notebooks execute in mode {nb_execution_mode!r}; cache {_CACHE.relative_to(HERE)} "
    f"({'present' if _CACHE.is_dir() else 'empty: every notebook runs once'})",
    flush=True,
)
nb_execution_timeout = 1800
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_execution_excludepatterns = []

# --- API reference: public names and public types only.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True  # show `key=0`, `dtype=jnp.float32` as written, not an array's repr
python_use_unqualified_type_names = True
autodoc_type_aliases = {
    "ArrayLike": "jax.typing.ArrayLike",
    "DTypeLike": "jax.typing.DTypeLike",
}
# jax.Array is a C++ class whose qualified name is the private ``jaxlib._jax.Array``; type hints show
# it under its public name (this renames it in the Sphinx process only, not in the executed notebooks).
import jax  # noqa: E402

jax.Array.__module__ = "jax"
jax.Array.__qualname__ = "Array"

napoleon_google_docstring = True
napoleon_use_ivar = True
napoleon_use_rtype = False

# --- theme: furo has a wide content column (code blocks up to ~100 characters at 1280 px).
html_theme = "furo"
html_title = "ppinfer"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"navigation_with_keys": True}


def _drop_namedtuple_noise(app, what, name, obj, options, lines):
    """A NamedTuple field without its own docstring gets "Alias for field number N": say nothing."""
    if len(lines) == 1 and lines[0].startswith("Alias for field number"):
        lines.clear()


def setup(app):
    app.connect("autodoc-process-docstring", _drop_namedtuple_noise)
