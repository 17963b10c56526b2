"""Token-level SMC under an exact token mask: ppinfer vs llamppl and genlm-control, same checkpoint.

The constraint: no generated token may contain the letter ``e`` (either case); EOS is allowed. All
three systems run SMC with the *locally constrained* proposal (the LM restricted to the allowed
tokens and renormalised; incremental log weight = log of the allowed probability mass), ESS-adaptive
systematic resampling at ESS < N/2, N particles, at most T new tokens, prompt ``<|endoftext|>import``:

- ppinfer: ``tokens.masked_next_token`` as the proposal of a ``condition``-ed token site, one
  jit-compiled ``lax.scan`` over tokens with a per-particle KV cache (JAX, CPU);
- llamppl 0.2.3: ``observe(context.mask_dist(mask), True)`` then ``sample(context.next_token())``
  (its documented hard-constraint idiom, exact), on its HF/torch backend with auto-batching
  ``batch_size = N`` and a low timeout;
- genlm-control 0.4.1: ``direct_token_sampler(llm * NoLetter)`` where ``NoLetter`` is a potential
  with a vectorised exact mask (``batch_logw_next`` one precomputed row), on the same HF/torch
  backend and auto-batching settings. genlm-control forces EOS at its ``max_tokens`` boundary, so it
  gets ``max_tokens = T + 1``: T sampled tokens and one EOS look-up, the same T forward passes per
  particle as the others (its target is the length-conditioned one; ppinfer's and llamppl's is the
  truncated one — the work is the same).

The checkpoint is the embedded default model (``models/default_lm``) exported by
``_hf_export.export_gpt2`` to a temporary local HF folder (weights, config and tokenizer; no hub
access); its logits are checked against the JAX model first. The peer caches are cleared before
every run (no memoised prefixes across runs); every timed run re-runs the prompt for all systems.
Times are medians of ``--reps`` runs after a warm-up run (ppinfer compiles once per size; the
peers, with nothing to compile, warm up once at the first size), interleaved in one process
(``_timing.interleaved_medians``). Peer tuning: auto-batching ``batch_size = N`` (a full batch is
evaluated at once) and a 1 ms timeout (``--timeout``; it only matters once some particles have
finished).

Equal threads: each thread count K of ``--threads`` (default ``1,2``) runs in its own child
process pinned to K cores (``os.sched_setaffinity``), with torch's intra-op threads set to K and
XLA's CPU client limited likewise (``XLA_FLAGS``, set before JAX starts), so both sides get the
same cores. The table and the ``RESULT`` line report every K.

What each backend does per token (per SMC step):

- ppinfer: one jitted batched forward pass of the N particles' new tokens (N positions) through
  the shared prompt cache and the particle KV cache (dense below T = 128, paged from there:
  ``tokens.prompt(..., cache="auto")``), attention in blocks up to the longest particle; the
  mask, the proposal, the weights and the resampling run in the same compiled loop (no Python per
  token).
- llamppl and genlm-control: genlm-backend's ``AsyncTransformer`` (HF transformers on torch;
  vLLM is GPU-only and not installed). Its cache keeps the prompt's keys/values only
  (``cache_kv``); each step, every particle's query is *all its generated tokens* after the prompt
  (``next_token_logprobs`` walks the trie to the deepest node with keys/values — the prompt — and
  sends ``token_ids[base:]``), batched with the other particles' queries into one padded forward;
  identical sequences are deduplicated. So step t feeds about N·t positions (O(N·T²) per run,
  against ppinfer's O(N·T)), plus Python/asyncio work per particle per step.

Needs the ``peers`` extra (``pip install torch==2.13.0`` first, then llamppl and genlm-control);
without it the script prints why and exits 0. Ends with
``RESULT speedup_vs_llamppl_n<N>_t<T>_threads<K>=<x> speedup_vs_genlm_...=<x> ...`` for every size
and thread count (peer time ÷ ppinfer time; ``--quick`` measures N=16, T=20 only).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import math
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _hf_export import export_gpt2  # noqa: E402
from _timing import interleaved_medians  # noqa: E402

import ppinfer as pp  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.lm import load_default, sequence_logits  # noqa: E402

PROMPT = "<|endoftext|>import"
LETTER = b"e"
PEERS = {"llamppl": "llamppl", "genlm": "genlm.control"}
INSTALL = "pip install torch==2.13.0 && pip install -e '.[peers]'"


def allowed_tokens(lm) -> np.ndarray:
    """``bool[V]``: tokens whose bytes do not contain ``LETTER`` (either case), EOS included."""
    allowed = np.array([LETTER not in t.lower() for t in lm.vocab_bytes])
    allowed[lm.eos_id] = True
    return allowed


def available_peers() -> tuple[dict[str, object], dict[str, str]]:
    """The importable peer modules by name, and why each missing one is missing."""
    found, missing = {}, {}
    for name in ("torch", "transformers"):
        try:
            importlib.import_module(name)
        except ImportError as error:
            return {}, {peer: f"{name} is not installed ({error})" for peer in PEERS}
    for peer, module in PEERS.items():
        try:
            found[peer] = importlib.import_module(module)
        except ImportError as error:
            missing[peer] = str(error)
    return found, missing


def check_parity(lm, folder: Path, tol: float = 1e-4) -> float:
    """Max |logit difference| between the exported HF model and the JAX model on a 40-token text;
    raises if it exceeds ``tol`` (the peers would then run a different model)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = lm.tokenizer.encode(PROMPT + " os, sys\ndef main(argv):\n    return 12+7")[:40]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits.numpy()[0]
    ours = np.asarray(sequence_logits(lm.params, lm.config, jnp.asarray([ids])))[0]
    diff = float(np.max(np.abs(hf - ours)))
    if not diff <= tol:
        raise SystemExit(f"exported HF checkpoint differs from the JAX model: max |Δlogit| = {diff:.2e}")
    return diff


# ---------------------------------------------------------------------------------------------
# ppinfer


def ppinfer_runner(lm, allowed: np.ndarray, n: int, t_max: int):
    """``run(seed) -> (texts, log_weights f32[N], log Ẑ)``: token-level SMC with the locally
    constrained proposal (the program of the module docstring)."""
    allowed = jnp.asarray(allowed)

    def init(p, allowed):
        return tk.Context.start(p)

    def step(ctx, t, p, allowed):
        tok = pp.sample("tok", ctx.next_token())
        pp.condition("no_letter", allowed[tok])
        pp.stop(tok == p.eos_id)
        return ctx.extend(p, tok)

    def proposal(ctx, t, p, allowed):
        pp.sample("tok", tk.masked_next_token(ctx, allowed))

    program = pp.sequential(init, step, t_max)
    algorithm = pp.SMC(n, proposal=proposal, ess_threshold=0.5, resampling="systematic")

    def run(seed):
        p = tk.prompt(lm, PROMPT, t_max)
        result = pp.infer(program, p, allowed, algorithm=algorithm, key=seed)
        jax.block_until_ready(result.state)
        texts = tk.texts(result.state, lm.tokenizer, lm.eos_id)
        return texts, np.asarray(result.log_weights), float(result.log_evidence)

    return run


# ---------------------------------------------------------------------------------------------
# llamppl


def llamppl_runner(llamppl, folder: Path, allowed: np.ndarray, eos_id: int, timeout: float):
    """``make(n, t_max) -> run(seed)`` for llamppl 0.2.3 on its HF backend (``AsyncTransformer``),
    auto-batching ``batch_size = n`` and ``timeout`` seconds."""
    lm = llamppl.CachedCausalLM.from_pretrained(str(folder), backend="hf", timeout=timeout)
    mask = {int(i) for i in np.flatnonzero(allowed)}
    prompt_ids = lm.tokenizer.encode(PROMPT)

    class NoLetter(llamppl.Model):
        def __init__(self, t_max):
            super().__init__()
            self.context = llamppl.LMContext(lm, PROMPT)
            self.t_max = t_max

        async def step(self):
            # Weight × allowed mass, and the next token is drawn from the masked LM (exact).
            await self.observe(self.context.mask_dist(mask), True)
            token = await self.sample(self.context.next_token())
            if token.token_id == eos_id or self.context.token_count >= self.t_max:
                self.finish()

    def make(n, t_max):
        def run(seed):
            import torch

            np.random.seed(seed)
            torch.manual_seed(seed)
            lm.model.batch_size = n
            lm.clear_cache()
            lm.cache_kv(prompt_ids)
            particles = asyncio.run(
                llamppl.smc_standard(NoLetter(t_max), n, ess_threshold=0.5, resampling_method="systematic")
            )
            weights = np.array([p.weight for p in particles])
            texts = [_text(p.context.tokens[len(prompt_ids) :], eos_id) for p in particles]
            return texts, weights, _log_mean_exp(weights)

        return run

    return make


# ---------------------------------------------------------------------------------------------
# genlm-control


def genlm_runner(control, folder: Path, allowed: np.ndarray, eos_id: int, timeout: float):
    """``make(n, t_max) -> run(seed)`` for genlm-control 0.4.1: ``PromptedLLM`` on the HF backend
    (auto-batching ``batch_size = n``, ``timeout``) times an exact-mask potential, sampled by
    ``direct_token_sampler`` (exact locally constrained proposal, autobatched)."""
    import torch
    from genlm.control.potential.base import Potential

    probe = control.PromptedLLM.from_name(str(folder), backend="hf", timeout=timeout)
    prompt_ids = probe.model.tokenizer.encode(PROMPT)
    llm = control.PromptedLLM(probe.model, prompt_ids=prompt_ids)
    # llm.vocab lists the non-EOS tokens in id order; EOS is the last column of vocab_eos.
    row = np.array([0.0 if allowed[tok.token_id] else -np.inf for tok in llm.vocab] + [0.0])
    row = torch.tensor(row, dtype=torch.float32)

    class NoLetter(Potential):
        """1 on token sequences that avoid the letter, 0 elsewhere; exact vectorised mask."""

        def __init__(self):
            super().__init__(llm.vocab, tables=llm.tables)

        async def prefix(self, context):
            return 0.0 if all(allowed[tok.token_id] for tok in context) else -math.inf

        async def complete(self, context):
            return await self.prefix(context)

        async def logw_next(self, context):
            return self.make_lazy_weights(row)

        async def batch_logw_next(self, contexts):
            return self.make_lazy_weights(row.expand(len(contexts), -1))

    sampler = control.direct_token_sampler(llm * NoLetter())

    def make(n, t_max):
        def run(seed):
            np.random.seed(seed)
            torch.manual_seed(seed)
            llm.model.batch_size = n
            llm.model.clear_cache()
            llm.model.cache_kv(prompt_ids)
            seqs = asyncio.run(
                sampler.smc(
                    n_particles=n, ess_threshold=0.5, max_tokens=t_max + 1, resampling_method="systematic"
                )
            )
            texts = [
                _text([tok.token_id for tok in ctx if tok is not control.EOS], eos_id)
                for ctx in seqs.contexts
            ]
            return texts, np.asarray(seqs.log_weights, float), float(seqs.log_ml)

        return run

    return make


# ---------------------------------------------------------------------------------------------


_VOCAB: list[bytes] = []


def _text(ids, eos_id: int) -> str:
    """Text of token ids (EOS dropped), decoded from the byte vocabulary like ppinfer's."""
    ids = [int(i) for i in ids if int(i) != eos_id]
    return b"".join(_VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def _keep_last(fn, store: dict, name: str):
    def run(seed):
        store[name] = fn(seed)

    return run


def _log_mean_exp(w: np.ndarray) -> float:
    m = np.max(w)
    return float(m + np.log(np.mean(np.exp(w - m)))) if np.isfinite(m) else -math.inf


def _check(name: str, out) -> str:
    texts, log_weights, log_z = out
    live = [t for t, w in zip(texts, log_weights, strict=True) if np.isfinite(w)]
    bad = [t for t in live if LETTER.decode() in t.lower()]
    if bad:
        raise SystemExit(f"{name}: a weighted particle contains {LETTER!r}: {bad[0]!r}")
    return f"{name}: {len(live)} weighted particles avoid {LETTER.decode()!r}, log Z = {log_z:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=16, T=20 only, 3 runs (< 60 s)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per size (default 5)")
    parser.add_argument("--timeout", type=float, default=1e-3, help="peers' auto-batching timeout (s)")
    parser.add_argument(
        "--threads",
        default="1,2",
        help="thread counts, each run in a child process on that many cores, for torch and JAX alike",
    )
    parser.add_argument("--sizes", default=None, help="NxT,... e.g. 16x20,64x128 (overrides the default)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    sizes = [(16, 20)] if opts.quick else [(16, 20), (16, 128), (64, 20), (64, 128)]
    if opts.sizes:
        sizes = [tuple(int(v) for v in size.split("x")) for size in opts.sizes.split(",")]
    reps = opts.reps or (3 if opts.quick else 5)

    if opts.child is None:
        peers, missing = available_peers()
        for peer, why in missing.items():
            print(f"SKIP {peer}: not installed ({why}); install the peers extra: {INSTALL}")
        if not peers:
            print("SKIPPED: no peer library is installed, nothing to compare against")
            return
        run_children(opts, [int(k) for k in opts.threads.split(",")])
        return
    peers, _ = available_peers()

    import torch

    torch.set_num_threads(opts.child)
    lm = load_default()
    _VOCAB[:] = lm.vocab_bytes
    allowed = allowed_tokens(lm)
    with tempfile.TemporaryDirectory(prefix="ppinfer_hf_") as tmp:
        folder = export_gpt2(lm, Path(tmp) / "default_lm")
        diff = check_parity(lm, folder)
        t0 = time.perf_counter()
        makers = {}
        if "llamppl" in peers:
            makers["llamppl"] = llamppl_runner(peers["llamppl"], folder, allowed, lm.eos_id, opts.timeout)
        if "genlm" in peers:
            makers["genlm"] = genlm_runner(peers["genlm"], folder, allowed, lm.eos_id, opts.timeout)
        load_s = time.perf_counter() - t0
        versions = {p: importlib.metadata.version({"genlm": "genlm-control"}.get(p, p)) for p in peers}
        print(
            f"embedded LM exported to HF GPT-2 ({folder.name}): max |Δlogit| vs JAX = {diff:.1e}; "
            f"peers loaded in {load_s:.1f} s; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"jax {jax.__version__} ({jax.devices()[0].platform}); "
            + ", ".join(f"{p} {v}" for p, v in versions.items())
        )
        print(
            f"constraint: no token containing {LETTER.decode()!r} ({int(allowed.sum())}/{allowed.size} "
            f"tokens allowed, EOS allowed), prompt {PROMPT!r}, ESS threshold 0.5, systematic resampling; "
            f"peers' batch_size = N, timeout = {opts.timeout * 1e3:g} ms; median of {reps} runs"
        )
        rows = []
        for index, (n, t_max) in enumerate(sizes):
            runners = {"ppinfer": ppinfer_runner(lm, allowed, n, t_max)}
            runners |= {peer: make(n, t_max) for peer, make in makers.items()}
            # Warm-up: ppinfer compiles once per (N, T); the peers have nothing to compile, so
            # they warm up (first torch calls, allocator) once, at the first size.
            for name, fn in runners.items():
                if name == "ppinfer" or index == 0:
                    t0 = time.perf_counter()
                    fn(0)
                    print(f"  N={n:>3} T={t_max:>3} {name:<8} warm-up {time.perf_counter() - t0:7.2f} s")
            last = {}
            fns = {name: _keep_last(fn, last, name) for name, fn in runners.items()}
            medians = interleaved_medians(fns, reps, seed=1)
            for name in fns:
                print(f"  N={n:>3} T={t_max:>3} median {medians[name]:7.3f} s  " + _check(name, last[name]))
            rows.append((n, t_max, medians))
        print()
        names = list(fns)
        header = f"{'N':>4}{'T':>5}" + "".join(f"{name + ' s':>13}" for name in names)
        header += "".join(f"{'× vs ' + p:>15}" for p in names[1:])
        print(header)
        for n, t_max, med in rows:
            line = f"{n:>4}{t_max:>5}" + "".join(f"{med[name]:>13.3f}" for name in names)
            line += "".join(f"{med[p] / med['ppinfer']:>15.1f}" for p in names[1:])
            print(line)
        print("(times: median wall seconds per SMC run; × = peer time ÷ ppinfer time)")
        for n, t_max, med in rows:
            print("ROW", n, t_max, " ".join(f"{name}={med[name]:.6f}" for name in names))


def run_children(opts, thread_counts: list[int]) -> None:
    """Run the comparison once per thread count K in a child process on K cores (torch threads
    and XLA's CPU threads K as well), print each child's output, then the summary and RESULT."""
    import os
    import subprocess

    cores = sorted(os.sched_getaffinity(0))
    rows: dict[int, list] = {}
    for k in thread_counts:
        if not 1 <= k <= len(cores):
            raise SystemExit(f"--threads {k}: this process may use {len(cores)} cores")
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen={'false' if k == 1 else 'true'}".strip()
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(k)
        argv = ["--timeout", str(opts.timeout), "--child", str(k)]
        argv += ["--quick"] if opts.quick else []
        argv += ["--reps", str(opts.reps)] if opts.reps else []
        argv += ["--sizes", opts.sizes] if opts.sizes else []
        cmd = ["taskset", "-c", ",".join(map(str, cores[:k])), sys.executable, __file__, *argv]
        print(f"== {k} thread(s): cores {cores[:k]}, torch threads {k}, XLA {env['XLA_FLAGS']!r}", flush=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        sys.stdout.write(out.stdout)
        if out.returncode:
            sys.stdout.write(out.stderr[-3000:])
            raise SystemExit(f"the {k}-thread run failed (exit {out.returncode})")
        rows[k] = []
        for line in out.stdout.splitlines():
            if line.startswith("ROW "):
                _, n, t_max, *pairs = line.split()
                rows[k].append((int(n), int(t_max), {a: float(b) for a, b in (p.split("=") for p in pairs)}))
    print("\nsummary (× = peer time ÷ ppinfer time, same cores and thread count on both sides)")
    for k, table in rows.items():
        for n, t_max, med in table:
            ratios = "  ".join(f"× vs {p} {med[p] / med['ppinfer']:.1f}" for p in med if p != "ppinfer")
            print(f"  threads {k}  N={n:>3} T={t_max:>3}  ppinfer {med['ppinfer']:.3f} s  {ratios}")
    result = []
    for k, table in rows.items():
        for n, t_max, med in table:
            result += [
                f"speedup_vs_{p}_n{n}_t{t_max}_threads{k}={med[p] / med['ppinfer']:.2f}"
                for p in ("llamppl", "genlm")
                if p in med
            ]
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
