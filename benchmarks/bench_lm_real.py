"""Real-size decoding on CPU: ppinfer vs transformers ``generate``, SMC vs plain sampling, memory.

Models (``_real_models.py``): random-weight GPT-2 small (124M) and a Llama-3.2-1B-shaped model,
written once as a Hugging Face folder (``config.json`` + ``model.safetensors``) that ppinfer
(``ppinfer.lm.load``) and ``transformers`` (``AutoModelForCausalLM.from_pretrained``) both load, so
the two sides run the same weights (checked: max |Δlogit| on the prompt). Both sides in **fp32**:
XLA:CPU runs bf16 matrix products several times slower than fp32 on this machine, where torch's
are faster than fp32 (``--profile`` times the logits product both ways on both sides), so bf16
would measure XLA:CPU's bf16 path, not ppinfer.

Measured, in one process, interleaved (``K`` = ``--threads`` on both sides: ``torch.set_num_threads
(K)``, ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=K`` set
before JAX starts, and the process pinned to K cores with ``os.sched_setaffinity`` — XLA:CPU's
thread pool ignores those flags; the CPU seconds each side uses are printed to show it):

- decode tokens/s at N = 1, 16, 64 sequences × T new tokens from a 16-token prompt: ppinfer's
  ``lm.generate`` (one jitted ``lax.scan`` over tokens; the prompt is run once and shared, each
  sequence keeps its own KV cache, sampling at temperature 1) vs ``model.generate(do_sample=True,
  top_k=0, top_p=1)`` with its KV cache (DynamicCache; EOS disabled so every sequence makes T
  tokens). Compilation (ppinfer) and a warm-up run (both) are excluded; medians of ``--reps``.
- token-level SMC under a regex (no letter ``e``; locally constrained proposal, ESS-adaptive
  resampling that gathers the KV caches; the program of ``bench_lm_smc.py``) vs plain sampling
  (``lm.generate``), same N and T. The vocabulary's bytes are synthetic (``synthetic_vocab``).
- memory per particle: KV-cache bytes computed from the shapes (ppinfer stores only generated
  tokens per particle, the prompt once; HF stores prompt + generated tokens per sequence), and the
  measured peak-RSS increase during a run at the largest N, divided by N.
- int8 weight-only quantisation (``load(..., quantize="int8")``): max |Δlogit| and KL vs fp32 on
  the prompt, bytes of the linear weights and of all params; ``--int8-decode`` also times decoding.
- ``--profile`` (default on in full runs): where one decode step's time goes on each side.

Findings (shared 2-core CPU, see ``docs/lm.md``): ppinfer makes 0.4–0.6× torch's tokens per CPU
second at N = 1 and 0.7–0.99× at N = 16–64 (0.99 pinned on a lightly loaded machine); the
profile puts the gap in the layer ``lax.scan``,
where XLA:CPU copies each layer's weights out of the stacked ``[Lyr, …]`` params before every
product (GPT-2 124M, N = 1: 128 ms of projections scanned vs 47 ms on per-layer arrays; torch's
whole forward 69 ms). SMC costs 0.99–1.2× plain sampling.

Ends with ``RESULT decode_ratio_vs_torch_124m_n16=<x> smc_over_plain_124m=<x>``: ppinfer tokens/s ÷
torch tokens/s at N = 16, and SMC time ÷ plain sampling time at N = 16 (GPT-2 124M), then
``decode_ratio_cpu_124m_n16`` (the same ratio in tokens per CPU second: steadier on a loaded
machine). Wall-clock medians on a shared CPU are noisy: the CPU-time ratio is printed next to each.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before JAX starts: the thread count is read when the backend starts
    _k = "1"
    for _i, _a in enumerate(sys.argv):
        if _a == "--threads" and _i + 1 < len(sys.argv):
            _k = sys.argv[_i + 1]
        elif _a.startswith("--threads="):
            _k = _a.split("=", 1)[1]
    # XLA:CPU (jax 0.10) still runs its own intra-op thread pool on every core whatever the flags
    # below say (measured: CPU seconds > wall seconds), so the process is also pinned to K cores.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(_k)])
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={_k}"
    ).strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _real_models import (  # noqa: E402
    kv_bytes_per_token,
    regex_ok,
    regex_smc,
    synthetic_vocab,
    write_checkpoint,
)

from ppinfer.lm import load  # noqa: E402
from ppinfer.lm.quantize import params_bytes  # noqa: E402

PROMPT = list(range(1000, 1016))  # 16 token ids (any ids: the weights are random)


# ---------------------------------------------------------------------------------------------
# timing and memory


def timed_medians(fns: dict[str, Callable[[int], object]], reps: int, seed: int = 100) -> dict:
    """``{name: (median wall s, median process CPU s)}`` of each ``fn(seed)`` over ``reps`` rounds,
    interleaved within each round (noise hits all alike). Each ``fn`` must block until done."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(reps):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(seed + i)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: ``delta`` = peak RSS inside the block (sampled every ``interval`` s by a
    thread) minus the RSS on entry, in bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.delta = 0

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.base
        return False


# ---------------------------------------------------------------------------------------------
# the two sides


def ppinfer_generate(lm, prompt, n: int, t: int) -> Callable[[int], object]:
    """``run(seed)``: ``lm.generate`` of n sequences of t tokens, blocking."""
    ids = jnp.asarray(prompt, jnp.int32)

    def run(seed):
        return jax.block_until_ready(lm.generate(ids, key=seed, num_particles=n, max_new_tokens=t))

    return run


def torch_generate(model, prompt, n: int, t: int) -> Callable[[int], object]:
    """``run(seed)``: ``model.generate`` (transformers, KV cache) of n sampled sequences of exactly
    t new tokens (EOS disabled; top-k/top-p off: plain sampling at temperature 1)."""
    import torch

    ids = torch.tensor([list(prompt)] * n, dtype=torch.long)
    mask = torch.ones_like(ids)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def run(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=t,
                min_new_tokens=t,
                use_cache=True,
            )
        assert out.shape == (n, len(prompt) + t), out.shape
        return out

    return run


def torch_logits(model, prompt) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([list(prompt)])).logits[0].float().numpy()


def logits_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a − b|, max over rows of KL(softmax a ‖ softmax b)) of two logits arrays [L, V]."""
    la, lb = jax.nn.log_softmax(jnp.asarray(a), -1), jax.nn.log_softmax(jnp.asarray(b), -1)
    kl = float(jnp.max(jnp.sum(jnp.exp(la) * (la - lb), -1)))
    return float(np.max(np.abs(a - b))), kl


# ---------------------------------------------------------------------------------------------
# profile: where a decode step's time goes


def layer_matmuls(params: dict, n: int, stacked: bool) -> tuple[Callable, tuple]:
    """A jitted chain of every layer's linear projections for an activation [n, D] (no attention,
    norms or logits), and its arguments: ``stacked`` runs a ``lax.scan`` over the params'
    stacked [Lyr, …] weights as ppinfer's step does; otherwise the same products on per-layer
    arrays (separate buffers, as torch holds them). The difference is the cost of slicing one
    layer's weights out of the stacked arrays inside the loop."""
    from ppinfer.lm.transformer import _dense

    layers = params["layers"]
    names = [k for k in ("q", "k", "v", "o", "gate", "up", "down") if k in layers]
    lin = {k: layers[k] for k in names}
    d = lin["q"]["w"].shape[1]
    x = jnp.full((n, d), 0.01, params["embed"].dtype)

    def block(x, p):
        h = _dense(p["q"], x) + _dense(p["k"], x).sum() + _dense(p["v"], x).sum()
        x = x + _dense(p["o"], h)
        u = _dense(p["up"], x)
        if "gate" in p:
            u = u * _dense(p["gate"], x)
        return x + 1e-3 * _dense(p["down"], jnp.tanh(u))

    if stacked:
        fn = jax.jit(lambda x, lin: jax.lax.scan(lambda x, p: (block(x, p), None), x, lin)[0])
        return fn, (x, lin)
    per_layer = [jax.tree.map(lambda a, i=i: a[i], lin) for i in range(lin["q"]["w"].shape[0])]
    per_layer = jax.block_until_ready(per_layer)

    def unrolled(x, ps):
        for p in ps:
            x = block(x, p)
        return x

    return jax.jit(unrolled), (x, per_layer)


def cpu_ms(fn: Callable, *args, reps: int = 5) -> float:
    """Median process-CPU milliseconds of ``fn(*args)`` (blocking) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        c0 = time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.process_time() - c0)
    return 1e3 * statistics.median(times)


def ppinfer_step_profile(lm, n: int, t: int) -> dict[str, float]:
    """CPU ms of one ``decode`` step of n particles (cache of t positions) and of the layer
    matmuls alone, scanned over stacked weights vs on per-layer weights."""
    from ppinfer.lm import decode

    _, prompt_cache = lm.prefill(PROMPT)
    tokens = jnp.zeros((n,), jnp.int32)
    state = {"cache": lm.init_particle_cache(prompt_cache, n, t)}

    def step():
        logits, state["cache"] = decode(lm.params, lm.config, prompt_cache, state["cache"], tokens)
        # keep the cache from filling up: the step stays at a fixed length
        state["cache"] = state["cache"]._replace(length=jnp.zeros((n,), jnp.int32))
        return logits

    head = lm.params["embed"]
    h = jnp.full((n, head.shape[1]), 0.01, head.dtype)
    logits_fn = jax.jit(lambda h, e: jnp.matmul(h, e.T, preferred_element_type=jnp.float32))
    out = {"decode step": cpu_ms(step)}
    out["layer matmuls, scan over stacked weights"] = cpu_ms(*_flat(layer_matmuls(lm.params, n, True)))
    out["layer matmuls, per-layer weights"] = cpu_ms(*_flat(layer_matmuls(lm.params, n, False)))
    out["logits matmul (tied embedding)"] = cpu_ms(logits_fn, h, head)
    bf16 = jnp.bfloat16
    out["same in bf16"] = cpu_ms(logits_fn, h.astype(bf16), head.astype(bf16))
    return out


def _flat(fn_args):
    fn, args = fn_args
    return (fn, *args)


def torch_step_profile(model, n: int, t: int) -> dict[str, float]:
    """CPU ms per token of ``generate`` and of the bare forward pass with a KV cache it calls."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([PROMPT] * n)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        nxt = torch.zeros((n, 1), dtype=torch.long)
        times = []
        for _ in range(t):
            c0 = time.process_time()
            model(nxt, past_key_values=cache, use_cache=True)
            times.append(time.process_time() - c0)
    head = model.get_output_embeddings().weight.detach()
    h = torch.full((n, head.shape[1]), 0.01)
    matmul = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = h.to(dtype), head.to(dtype)
            a @ b.T
            c0 = time.process_time()
            for _ in range(5):
                a @ b.T
            matmul[name] = 1e3 * (time.process_time() - c0) / 5
    gen = torch_generate(model, PROMPT, n, t)
    gen(0)
    c0 = time.process_time()
    gen(1)
    per_token = (time.process_time() - c0) / t
    return {
        "forward with KV cache": 1e3 * statistics.median(times),
        "generate, per token": 1e3 * per_token,
        "logits matmul fp32": matmul["fp32"],
        "logits matmul bf16": matmul["bf16"],
    }


# ---------------------------------------------------------------------------------------------


def run_shape(shape, layers, opts, folder: Path, out: dict) -> None:
    import torch
    import transformers

    t0 = time.perf_counter()
    write_checkpoint(folder, shape, num_layers=layers)
    lm = load(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    c = lm.config
    n_params = sum(x.size for x in jax.tree.leaves(lm.params))
    print(
        f"\n== {shape} ({c.num_layers} layers, d={c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads}, "
        f"vocab {c.vocab_size}; {n_params / 1e6:.1f}M params, fp32) — written and loaded by both in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    ours = np.asarray(lm.prefill(PROMPT)[0])
    gap, _ = logits_gap(ours, torch_logits(model, PROMPT))
    print(f"same weights: max |Δlogit| ppinfer vs transformers on the prompt = {gap:.1e}")

    if opts.quick and shape != "gpt2-124m":
        print("int8 weight-only: measured on GPT-2 only under --quick (time budget)")
    else:
        lm8 = load(folder, quantize="int8")
        err, kl = logits_gap(np.asarray(lm8.prefill(PROMPT)[0]), ours)
        lin32, lin8 = params_bytes(lm.params, True), params_bytes(lm8.params, True)
        all32, all8 = params_bytes(lm.params), params_bytes(lm8.params)
        print(
            f"int8 weight-only: max |Δlogit| vs fp32 = {err:.2e} (fp32 logits span "
            f"{float(ours.max() - ours.min()):.2f}), max KL = {kl:.1e}; linear weights "
            f"{lin32 / 2**20:.0f} -> {lin8 / 2**20:.0f} MiB ({lin8 / lin32:.3f}x), all params "
            f"{all32 / 2**20:.0f} -> {all8 / 2**20:.0f} MiB ({all8 / all32:.3f}x; embeddings stay fp32)"
        )
        out[f"int8_err_{shape}"] = err

    t, reps = opts.tokens, opts.reps
    sizes = [int(s) for s in opts.sizes.split(",")]
    if opts.quick and shape != "gpt2-124m":
        sizes = sizes[:1]  # --quick: the Llama shape at the first N only (time budget)
    print(f"decode: {len(PROMPT)}-token prompt, T={t} new tokens, median of {reps} (wall s | CPU s)")
    header = f"{'N':>4}{'ppinfer tok/s':>15}{'torch tok/s':>13}{'ratio wall':>12}{'ratio CPU':>11}"
    print(header + "  (CPU s ppinfer | torch)")
    for n in sizes:
        fns = {"ppinfer": ppinfer_generate(lm, PROMPT, n, t), "torch": torch_generate(model, PROMPT, n, t)}
        if opts.int8_decode:
            fns["int8"] = ppinfer_generate(lm8, PROMPT, n, t)
        for fn in fns.values():
            fn(0)  # compile (ppinfer) / warm up (both)
        med = timed_medians(fns, reps)
        (wp, cp), (wt, ct) = med["ppinfer"], med["torch"]
        line = f"{n:>4}{n * t / wp:>15.1f}{n * t / wt:>13.1f}{wt / wp:>12.2f}{ct / cp:>11.2f}"
        line += f"  ({cp:.2f} | {ct:.2f})"
        if "int8" in med:
            line += f"  int8 {n * t / med['int8'][0]:.1f} tok/s"
        print(line)
        out[f"decode_ratio_{shape}_n{n}"] = wt / wp
        out[f"decode_ratio_cpu_{shape}_n{n}"] = ct / cp

    vocab = synthetic_vocab(c.vocab_size)
    # --quick times SMC on GPT-2 only (the Llama shape's compile and runs would double its time).
    smc_sizes = [] if opts.quick and shape != "gpt2-124m" else [int(s) for s in opts.smc_sizes.split(",")]
    for n in smc_sizes:
        smc = regex_smc(lm, vocab, PROMPT, n, t)
        plain = ppinfer_generate(lm, PROMPT, n, t)
        result = smc(0)
        plain(0)
        med = timed_medians({"smc": smc, "plain": plain}, reps)
        (ws, cs), (wpl, cpl) = med["smc"], med["plain"]
        ok = regex_ok(smc(1), vocab, lm.eos_id)
        print(
            f"SMC (regex, N={n}, T={t}): {ws:.3f} s ({n * t / ws:.1f} tok/s) vs plain {wpl:.3f} s: "
            f"SMC/plain = {ws / wpl:.2f} wall, {cs / cpl:.2f} CPU; log Z = {float(result.log_evidence):.2f}, "
            f"weighted particles avoid 'e': {ok}"
        )
        out[f"smc_over_plain_{shape}_n{n}"] = ws / wpl

    n = max(sizes)
    kv = kv_bytes_per_token(c, 4)
    if opts.quick and shape != "gpt2-124m":
        print(f"KV cache per token: {kv / 2**10:.0f} KiB (fp32); RSS not measured under --quick")
        return
    gen_pp, gen_hf = ppinfer_generate(lm, PROMPT, n, t), torch_generate(model, PROMPT, n, t)
    with PeakRSS() as pp_rss:
        gen_pp(7)
    with PeakRSS() as hf_rss:
        gen_hf(7)
    print(
        f"memory per sequence at N={n}, T={t}: KV cache computed {kv * t / 2**20:.2f} MiB ppinfer "
        f"(generated tokens; prompt shared once: {kv * len(PROMPT) / 2**20:.2f} MiB) vs "
        f"{kv * (len(PROMPT) + t) / 2**20:.2f} MiB transformers (prompt + generated); measured peak-RSS "
        f"increase per sequence: ppinfer {pp_rss.delta / n / 2**20:.2f} MiB, transformers "
        f"{hf_rss.delta / n / 2**20:.2f} MiB"
    )

    if opts.profile:
        for n in sorted({1, 16} & set(sizes)):
            prof = ppinfer_step_profile(lm, n, t)
            prof |= {"torch " + k: v for k, v in torch_step_profile(model, n, t).items()}
            print(f"profile, N={n} (CPU ms per step): " + "; ".join(f"{k} {v:.1f}" for k, v in prof.items()))
    del model, lm, lm8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="N=1,16, T=8, 2 runs; 2-layer Llama at N=1 only, no int8 row"
    )
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and XLA (default 1)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per sequence (default 32)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default 5; quick 2)")
    parser.add_argument("--sizes", default=None, help="decode N values (default 1,16,64; quick 1,16)")
    parser.add_argument("--smc-sizes", default=None, help="SMC N values (default 16,64; quick 16)")
    parser.add_argument("--llama-layers", type=int, default=None, help="Llama depth (default 16; quick 2)")
    parser.add_argument("--shapes", default="gpt2-124m,llama-1b")
    parser.add_argument(
        "--profile", action=argparse.BooleanOptionalAction, default=None, help="default: on unless --quick"
    )
    parser.add_argument("--int8-decode", action="store_true", help="also time int8 decoding")
    opts = parser.parse_args()
    q = opts.quick
    opts.tokens = opts.tokens or (8 if q else 32)
    opts.reps = opts.reps or (2 if q else 5)
    opts.sizes = opts.sizes or ("1,16" if q else "1,16,64")
    opts.smc_sizes = opts.smc_sizes or ("16" if q else "16,64")
    opts.llama_layers = opts.llama_layers or (2 if q else 16)
    opts.profile = (not q) if opts.profile is None else opts.profile

    import torch
    import transformers

    torch.set_num_threads(opts.threads)
    t_start = time.perf_counter()
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; pinned to cores {sorted(os.sched_getaffinity(0))} "
        f"of {os.cpu_count()} (shared machine: timings noisy)"
    )
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ppinfer_real_") as tmp:
        for shape in opts.shapes.split(","):
            layers = opts.llama_layers if shape == "llama-1b" else None
            run_shape(shape, layers, opts, Path(tmp) / shape, out)
    wall = time.perf_counter() - t_start
    print(f"\ntotal {wall:.0f} s wall, {time.process_time():.0f} s CPU of this process")
    keys = {
        "decode_ratio_vs_torch_124m_n16": "decode_ratio_gpt2-124m_n16",
        "smc_over_plain_124m": "smc_over_plain_gpt2-124m_n16",
        "decode_ratio_cpu_124m_n16": "decode_ratio_cpu_gpt2-124m_n16",
    }
    if not all(key in out for key in keys.values()):
        print("RESULT (GPT-2 124M at N=16 not measured: needs gpt2-124m in --shapes, 16 in both sizes)")
        return
    print("RESULT " + " ".join(f"{name}={out[key]:.3f}" for name, key in keys.items()))


if __name__ == "__main__":
    main()
