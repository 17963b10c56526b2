"""One command for a machine with an NVIDIA GPU: devices, CPU-vs-GPU logits parity, LM-SMC speed.

Install first: ``pip install -e ".[cuda]"`` (jax[cuda12]; ``.[cuda13]`` for CUDA 13 drivers). Then::

    python benchmarks/gpu_check.py            # full: a few minutes on one GPU
    python benchmarks/gpu_check.py --quick    # small sizes; also runs on a CPU-only machine

1. Devices: JAX's backend and devices, the installed jax/jaxlib/CUDA-plugin versions,
   ``nvidia-smi`` (if present).
2. Parity: the same params on the CPU and on the GPU (``jax.device_put``), prompt logits and two
   decode steps of 4 particles, max |Δlogit| — for the embedded default model
   (``ppinfer.lm.load_default()``) and a random GPT-2-124M-shaped model (``_real_models.py``;
   ``--quick``: 2 layers), in fp32 (JAX's default matmul precision, which may use TF32 on the GPU,
   and ``"highest"``) and bf16 (bf16 on both devices), plus int8 weight-only vs fp32 on the GPU.
   Without a GPU the "GPU" side is the CPU again (Δ must be 0: a self-check of the script).
3. LM-SMC tokens/s: token-level SMC under a regex (no letter ``e``; locally constrained proposal,
   the program of ``bench_lm_smc.py``) and plain sampling (``lm.generate``) at N = 64, 256, 1024
   particles × T new tokens (``--quick``: N = 16, 64), on both models, on the default device;
   compile time excluded, median of ``--reps`` runs.

Every section catches its own errors (printed with their traceback, marked ``failed`` in the
RESULT line), so a blind run always reaches the end. Ends with ``RESULT gpu=<name|none> ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _real_models import regex_ok, regex_smc, synthetic_vocab, write_checkpoint  # noqa: E402

from ppinfer.lm import decode, load, load_default  # noqa: E402

DEFAULT_PROMPT = "<|endoftext|>import os, sys\ndef main(argv):\n    return 12+7"
RANDOM_PROMPT = list(range(1000, 1040))


def accelerator() -> jax.Device | None:
    """The first GPU device, or None."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return gpus[0] if gpus else None


def device_report() -> dict:
    """Backend, devices and package versions (and nvidia-smi's first lines when available)."""
    versions = {}
    plugins = [f"jax-cuda{v}-{kind}" for v in (12, 13) for kind in ("plugin", "pjrt")]
    for dist in ("jax", "jaxlib", *plugins):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    report = {
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()],
        "versions": versions,
    }
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
            report["nvidia-smi"] = "\n".join(smi.stdout.splitlines()[:12])
        except (OSError, subprocess.SubprocessError) as error:
            report["nvidia-smi"] = f"nvidia-smi failed: {error}"
    return report


def on_device(lm, device: jax.Device):
    """``lm`` with its params placed on ``device``."""
    return dataclasses.replace(lm, params=jax.device_put(lm.params, device))


def forward_logits(lm, prompt_ids, device: jax.Device) -> np.ndarray:
    """Prompt logits f32[Lp, V] and two decode steps of 4 particles f32[2, 4, V], computed on
    ``device``, concatenated to one array f32[Lp + 8, V]."""
    with jax.default_device(device):
        lm = on_device(lm, device)
        ids = jax.device_put(jnp.asarray(prompt_ids, jnp.int32), device)
        logits, prompt_cache = lm.prefill(ids)
        cache = lm.init_particle_cache(prompt_cache, 4, 4)
        rows = [np.asarray(logits, np.float32)]
        for toks in ([1, 2, 3, 4], [5, 6, 7, 8]):
            step, cache = decode(lm.params, lm.config, prompt_cache, cache, jnp.asarray(toks, jnp.int32))
            rows.append(np.asarray(step, np.float32))
    return np.concatenate(rows)


def parity(lm, prompt_ids, device_a: jax.Device, device_b: jax.Device, precision: str | None = None) -> float:
    """max |Δlogit| between ``device_a`` and ``device_b`` on :func:`forward_logits`, under JAX's
    matmul ``precision`` (None: the default)."""
    with jax.default_matmul_precision(precision):
        a = forward_logits(lm, prompt_ids, device_a)
        b = forward_logits(lm, prompt_ids, device_b)
    return float(np.max(np.abs(a - b)))


def smc_rates(lm, vocab, prompt_ids, n: int, t: int, reps: int) -> dict[str, float]:
    """Tokens/s (N·T ÷ median wall time) of regex SMC and of plain ``lm.generate`` at N = n
    particles and T = t new tokens on the default device, after a compiling run; also the compile
    times, SMC ÷ plain, and whether every weighted SMC particle satisfies the regex."""
    smc = regex_smc(lm, vocab, prompt_ids, n, t)
    ids = jnp.asarray(prompt_ids, jnp.int32)

    def plain(seed):
        return jax.block_until_ready(lm.generate(ids, key=seed, num_particles=n, max_new_tokens=t))

    out = {}
    for name, fn in (("smc", smc), ("plain", plain)):
        t0 = time.perf_counter()
        result = fn(0)
        out[f"{name}_compile_s"] = time.perf_counter() - t0
        if name == "smc":
            out["regex_ok"] = float(regex_ok(result, vocab, lm.eos_id))
    times = {"smc": [], "plain": []}
    for i in range(reps):
        for name, fn in (("smc", smc), ("plain", plain)):
            t0 = time.perf_counter()
            fn(1 + i)
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        out[f"{name}_tok_s"] = n * t / statistics.median(ts)
    out["smc_over_plain"] = out["plain_tok_s"] / out["smc_tok_s"]
    return out


def _section(name: str, failures: list[str]):
    """Decorator-free guard: ``with _section(...)`` prints an exception and records the failure."""

    class Guard:
        def __enter__(self):
            print(f"\n== {name}", flush=True)

        def __exit__(self, kind, error, tb):
            if error is not None:
                traceback.print_exception(kind, error, tb)
                print(f"!! {name} failed: {kind.__name__}: {error}", flush=True)
                failures.append(name)
            return True  # keep going

    return Guard()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU-only machines too)")
    parser.add_argument("--sizes", default=None, help="SMC particle counts (64,256,1024; quick 16,64)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens (default 64; quick 16)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default 5; quick 2)")
    opts = parser.parse_args()
    sizes = [int(s) for s in (opts.sizes or ("16,64" if opts.quick else "64,256,1024")).split(",")]
    t = opts.tokens or (16 if opts.quick else 64)
    reps = opts.reps or (2 if opts.quick else 5)
    t_start = time.perf_counter()
    failures: list[str] = []
    result: dict[str, str] = {}

    gpu = accelerator()
    cpu = jax.devices("cpu")[0]
    with _section("devices", failures):
        report = device_report()
        for key, value in report.items():
            print(f"{key}: {value}")
        if gpu is None:
            print("NO GPU PRESENT: parity compares the CPU with itself (must be 0); speeds are CPU speeds")
    result["gpu"] = gpu.device_kind.replace(" ", "_") if gpu is not None else "none"
    other = gpu if gpu is not None else cpu

    models = {}
    with _section("models", failures):
        default = load_default()
        models["default"] = (default, list(default.tokenizer.encode(DEFAULT_PROMPT)), default.vocab_bytes)
        tmp = tempfile.mkdtemp(prefix="ppinfer_gpu_check_")
        folder = write_checkpoint(Path(tmp) / "gpt2", "gpt2-124m", num_layers=2 if opts.quick else None)
        big = load(folder)
        models["124m"] = (big, RANDOM_PROMPT, synthetic_vocab(big.config.vocab_size))
        for name, (lm, _, _) in models.items():
            n_params = sum(x.size for x in jax.tree.leaves(lm.params))
            c = lm.config
            print(f"{name}: {c.num_layers} layers, d={c.hidden_size}, {n_params / 1e6:.1f}M params")

    for name, (lm, ids, _) in models.items():
        with _section(f"parity CPU vs {other.platform}: {name}", failures):
            d_default = parity(lm, ids, cpu, other)
            d_highest = parity(lm, ids, cpu, other, "highest")
            lm16 = load_default(jnp.bfloat16) if name == "default" else load(folder, dtype=jnp.bfloat16)
            d_bf16 = parity(lm16, ids, cpu, other)
            ref = forward_logits(lm, ids, other)
            span = float(ref.max() - ref.min())
            gap_bf16 = float(np.max(np.abs(forward_logits(lm16, ids, other) - ref)))
            gap_int8 = float(np.max(np.abs(forward_logits(lm.quantize("int8"), ids, other) - ref)))
            print(
                f"max |Δlogit| CPU vs {other.platform}: fp32 {d_default:.2e} (default precision), "
                f"{d_highest:.2e} (highest); bf16 {d_bf16:.2e}. On {other.platform}: bf16 vs fp32 "
                f"{gap_bf16:.2e}, int8 vs fp32 {gap_int8:.2e} (logits span {span:.1f})"
            )
            result[f"parity_fp32_{name}"] = f"{d_default:.2e}"
            result[f"parity_fp32_highest_{name}"] = f"{d_highest:.2e}"
            result[f"parity_bf16_{name}"] = f"{d_bf16:.2e}"

    for name, (lm, ids, vocab) in models.items():
        for n in sizes:
            with _section(f"LM-SMC {name}, N={n}, T={t} on {jax.default_backend()}", failures):
                rates = smc_rates(lm, vocab, ids, n, t, reps)
                print(
                    f"SMC {rates['smc_tok_s']:.0f} tok/s (compile {rates['smc_compile_s']:.1f} s), plain "
                    f"{rates['plain_tok_s']:.0f} tok/s (compile {rates['plain_compile_s']:.1f} s), SMC/plain "
                    f"time {rates['smc_over_plain']:.2f}, weighted particles satisfy the regex: "
                    f"{bool(rates['regex_ok'])}"
                )
                result[f"smc_tok_s_{name}_n{n}"] = f"{rates['smc_tok_s']:.0f}"
                result[f"smc_over_plain_{name}_n{n}"] = f"{rates['smc_over_plain']:.2f}"

    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; failed sections: {failures or 'none'}")
    result["failed"] = str(len(failures))
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
