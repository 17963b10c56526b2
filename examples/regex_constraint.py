"""A regular-expression constraint on the embedded LM, three ways: plain sampling + rejection,
SMC with the LM as proposal (bootstrap: particles die when they break the pattern), and SMC with the
locally constrained proposal (the LM masked by the regex automaton: no particle dies)."""

import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppinfer as pp  # noqa: E402
from models.lm_programs import PYTHON_DEF_PATTERN, parses_as_def, python_def  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402


def main(num_particles: int = 64, max_new_tokens: int = 20) -> dict:
    """Prints one line per method; returns, per method, ``log_z`` (None when every particle died),
    the particles' ``texts`` (without EOS), normalised ``weights``, ``log_weights`` and ``finished``
    (ended with EOS)."""
    lm = load_default()
    program, args, proposal = python_def(lm, max_new_tokens)
    out = {}
    for name, algorithm in [
        ("bootstrap SMC", pp.SMC(num_particles)),
        ("locally constrained SMC", pp.SMC(num_particles, proposal=proposal)),
    ]:
        try:
            r = pp.infer(program, *args, algorithm=algorithm, key=0)
        except pp.ZeroEvidenceError as e:
            print(f"{name:>24}: every particle broke the constraint ({str(e)[:60]}…)")
            out[name] = {"log_z": None}
            continue
        texts = tk.texts(r.state[0], lm.tokenizer, lm.eos_ids)
        toks, lens = np.asarray(r.state[0].tokens), np.asarray(r.state[0].length)
        alive = np.asarray(r.weights) > 0
        valid = all(
            re.fullmatch(PYTHON_DEF_PATTERN, t) and parses_as_def(t)
            for t, a in zip(texts, alive, strict=True)
            if a
        )
        top = texts[int(np.argmax(np.asarray(r.weights)))]
        print(
            f"{name:>24}: log Ẑ {r.log_evidence:7.2f}  live particles {int(alive.sum()):3d}  "
            f"all valid {valid}  top: def{top}"
        )
        out[name] = {
            "log_z": float(r.log_evidence),
            "texts": texts,
            "weights": np.asarray(r.weights, np.float64),
            "log_weights": np.asarray(r.log_weights, np.float64),
            "finished": [n > 0 and int(row[n - 1]) in lm.eos_ids for row, n in zip(toks, lens, strict=True)],
        }
    return out


if __name__ == "__main__":
    main()
