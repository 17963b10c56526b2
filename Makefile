# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test docs docs-check bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# torch is installed on its own, pinned, before anything that depends on it: that CPU build is local.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# Headless Chromium for the HTML-view and docs-page tests (Debian's package; best effort: the
	# tests skip, saying why, where it cannot be installed).
	command -v chromium >/dev/null 2>&1 || (apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || true
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PIP) install -q -e ".[docs]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m ppinfer.demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist loadscope -q --durations=15 tests

# Tutorials and how-to pages are notebooks executed on the first build and cached (docs/_build/.jupyter_cache)
# until their code changes; Sphinx prints each page it reads and each notebook it executes.
docs: $(VENV)/.installed-docs
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

# Builds the docs, then screenshots every page in headless Chromium (docs/_build/screenshots/) and fails
# on raw TeX in a page's text or a code block that overflows horizontally at a 1280-px-wide window.
docs-check: docs
	$(PY) docs/check_pages.py docs/_build/html --screenshots docs/_build/screenshots

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_classic_pf.py --quick

lint: $(VENV)/.installed-test
	$(PY) -m ruff check ppinfer semantics models tests benchmarks examples docs/conf.py docs/check_pages.py

clean:
	rm -rf $(VENV) docs/_build
