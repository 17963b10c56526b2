"""Every ```python block of README.md runs as written, on its own, in a fresh Python process (no
names carried over from another block), then a few checks on its values run in the same process:
the examples a new user copies first must work and show what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Checks appended to the block whose source contains the key (they run in the block's namespace).
CHECKS = {
    "pp.SMC(num_particles=1000)": """
import numpy as np
assert result.samples["x"].shape == (1000, 5)
assert np.isfinite(result.log_evidence) and 1.0 <= result.ess.min() <= 1000
""",
    "has_e = ": """
import numpy as np
shown = tk.texts(result, lm.tokenizer)
assert shown and all(w > 0 for _, w in shown) and abs(sum(w for _, w in shown) - 1) < 1e-5
assert all("e" not in t.lower() for t, _ in shown), shown   # the constraint holds on what is shown
every = tk.texts(result, lm.tokenizer, all_particles=True)
assert len(every) == 64 and sum(w > 0 for _, w in every) == len(shown)
""",
    "JSONSchema(schema)": """
import json
shown = tk.texts(result)
assert shown
for text, _ in shown:
    doc = json.loads(text)
    assert doc["kind"] in ("class", "def") and 1 <= doc["line"] <= 999, text
""",
    "check_exact(hmm": """
assert report.ok and report.max_abs_error < 1e-6, report
""",
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = python_blocks((ROOT / "README.md").read_text())


def test_blocks_found():
    """The extraction sees every block, and every check matches exactly one block."""
    assert len(BLOCKS) == 4
    for key in CHECKS:
        assert sum(key in block for block in BLOCKS) == 1, key


def test_extraction_catches_a_broken_block(tmp_path):
    """The runner fails on a block that uses a name it does not import (the README's old token
    example used ``jnp`` without importing it)."""
    out = run_block("x = jnp.zeros(3)\n", tmp_path)
    assert out.returncode != 0 and "NameError" in out.stderr


def run_block(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_block_runs(index, tmp_path):
    block = BLOCKS[index]
    checks = "".join(check for key, check in CHECKS.items() if key in block)
    out = run_block(block + "\n" + checks, ROOT)
    assert out.returncode == 0, f"README block {index} failed:\n{block}\n--- stderr ---\n{out.stderr[-3000:]}"
