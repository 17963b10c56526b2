"""Structured generation: SMC under a JSON schema vs plain batched sampling, same model, same process.

Embedded default LM, N = 64 particles, up to 128 new tokens, a JSON schema with nested objects,
arrays, enums, integers and a bounded number. SMC: ``tokens.constrained(prompt, JSONSchema(schema))``
— the locally constrained proposal with its allowed-mass weight, the schema compiled to a token
automaton on device (the mask of a population is one gather). Plain: ``LanguageModel.generate`` —
one jitted scan sampling N sequences with no constraint (almost none of them is valid JSON). Both
compiled before timing; medians of interleaved runs.

Also measured: the mask time per particle per token (ours: the batched gather on device; and, on the
same schema and vocabulary, llguidance, outlines-core and xgrammar when installed), the compile time
of each engine, and — when ``genlm-control`` is installed (the ``peers`` extra) — genlm-control's
JSON potential (``JsonSchema(schema).coerce(llm, b"".join)`` sampled by ``AWRS``) on the embedded LM
exported to a Hugging Face folder, same N and T, with torch and JAX both given the same threads.

Ends with ``RESULT structured_over_plain=<x> speedup_vs_genlm_json=<x> mask_us_per_token=<x>``
(SMC time ÷ plain time; genlm-control time ÷ ours, ``nan`` when genlm-control is not installed;
our mask µs per particle per token). ``--quick``: N = 16, T = 96, 3 runs, no genlm-control (< 90 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_medians  # noqa: E402

import ppinfer as pp  # noqa: E402
from ppinfer import tokens as tk  # noqa: E402
from ppinfer.constraints import JSONSchema  # noqa: E402
from ppinfer.lm import load_default  # noqa: E402

PROMPT = "<|endoftext|>record = "
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["module", "class", "function"]},
        "version": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                "active": {"type": "boolean"},
            },
            "required": ["id", "active"],
        },
    },
    "required": ["name", "kind", "version", "tags", "owner"],
}


def valid(text: str) -> bool:
    import jsonschema

    try:
        return jsonschema.Draft202012Validator(SCHEMA).is_valid(json.loads(text))
    except json.JSONDecodeError:
        return False


def median_us(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


# --- engines on the same schema and vocabulary -----------------------------------------------------


def engine_llguidance(vocab, eos, doc_tokens):
    import llguidance

    from ppinfer.constraints import _GreedyTokenizer

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_GreedyTokenizer(vocab, eos)))
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        {**SCHEMA, "additionalProperties": False},
        defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    )
    m = llguidance.LLMatcher(tok, grammar, log_level=0)
    compile_s = time.perf_counter() - t0
    import llguidance.numpy as llnp

    bits = np.zeros((1, -(-len(vocab) // 32)), np.int32)
    t0 = time.perf_counter()
    n = 0
    for t in doc_tokens:
        llnp.fill_next_token_bitmask(m, bits, 0)
        m.consume_token(t)
        n += 1
    mask_us = (time.perf_counter() - t0) / n * 1e6
    m.reset()
    copy_us = median_us(m.deep_copy, 200)
    return {"compile_s": compile_s, "mask_us": mask_us, "copy_us": copy_us, "followed": n - m.is_error()}


def engine_outlines(vocab, eos, doc_tokens):
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
    mapping: dict = {}
    for i, b in enumerate(vocab):
        if i != eos and b:
            mapping.setdefault(b, []).append(i)
    index = oc.Index(regex, oc.Vocabulary(eos, mapping))
    compile_s = time.perf_counter() - t0
    s = index.get_initial_state()
    t0 = time.perf_counter()
    n = 0
    for t in doc_tokens:
        index.get_allowed_tokens(s)
        nxt = index.get_next_state(s, t)
        if nxt is None:
            break
        s, n = nxt, n + 1
    mask_us = (time.perf_counter() - t0) / max(n, 1) * 1e6
    return {"compile_s": compile_s, "mask_us": mask_us, "copy_us": 0.0, "followed": n}


def engine_xgrammar(vocab, eos, doc_tokens):
    import torch
    import xgrammar as xg

    torch.set_num_threads(1)
    info = xg.TokenizerInfo(list(vocab), vocab_type=xg.VocabType.RAW, stop_token_ids=[eos])
    t0 = time.perf_counter()
    compiler = xg.GrammarCompiler(info, max_threads=1)
    compiled = compiler.compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "), strict_mode=True
    )
    matcher = xg.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bitmask = xg.allocate_token_bitmask(1, info.vocab_size)
    t0 = time.perf_counter()
    n = 0
    for t in doc_tokens:
        matcher.fill_next_token_bitmask(bitmask)
        if not matcher.accept_token(t):
            break
        n += 1
    mask_us = (time.perf_counter() - t0) / max(n, 1) * 1e6
    copy_us = median_us(matcher.fork, 200) if hasattr(matcher, "fork") else float("nan")
    return {"compile_s": compile_s, "mask_us": mask_us, "copy_us": copy_us, "followed": n}


# --- genlm-control -------------------------------------------------------------------------------------


def genlm_runner(lm, folder: Path, n: int, t_max: int):
    import torch
    from genlm.control import AWRS, JsonSchema, PromptedLLM

    probe = PromptedLLM.from_name(str(folder), backend="hf", timeout=1e-3)
    prompt_ids = probe.model.tokenizer.encode(PROMPT)
    llm = PromptedLLM(probe.model, prompt_ids=prompt_ids)
    condition = JsonSchema(SCHEMA).coerce(llm, f=b"".join)
    sampler = AWRS(llm, condition)

    def run(seed):
        np.random.seed(seed)
        torch.manual_seed(seed)
        llm.model.batch_size = n
        llm.model.clear_cache()
        llm.model.cache_kv(prompt_ids)
        seqs = asyncio.run(sampler.smc(n_particles=n, ess_threshold=0.5, max_tokens=t_max))
        return seqs

    return run


# --- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=16, T=96, 3 runs, no genlm-control (< 90 s)")
    parser.add_argument("--particles", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-genlm", action="store_true", help="skip genlm-control")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for genlm-control (default 1)")
    opts = parser.parse_args()
    n = opts.particles or (16 if opts.quick else 64)
    t_max = opts.tokens or (96 if opts.quick else 128)
    reps = opts.reps or (3 if opts.quick else 5)
    t_start = time.perf_counter()

    lm = load_default()
    vocab, eos = lm.vocab_bytes, lm.eos_id
    print(
        f"embedded LM ({lm.config.arch}, V={len(vocab)}), jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs; N={n}, T={t_max}, prompt {PROMPT!r}"
    )

    # 1. compile the constraint
    t0 = time.perf_counter()
    constraint = JSONSchema(SCHEMA)
    auto = constraint.compile(vocab, eos)
    compile_s = time.perf_counter() - t0
    print(
        f"ppinfer JSONSchema → regex ({len(constraint.regex)} chars) → byte DFA → token table: "
        f"{auto.num_states} states × {len(vocab)} tokens = {auto.next_state.nbytes / 2**20:.1f} MiB, "
        f"compiled in {compile_s:.2f} s"
    )

    # 2. SMC vs plain sampling
    p = tk.prompt(lm, PROMPT, max_new_tokens=t_max)
    program = tk.constrained(p, constraint)
    algorithm = pp.SMC(n)

    def smc(seed):
        r = pp.infer(program, algorithm=algorithm, key=seed)
        jax.block_until_ready(r.log_weights)
        return r

    def plain(seed):
        return jax.block_until_ready(lm.generate(PROMPT, key=seed, num_particles=n, max_new_tokens=t_max))

    t0 = time.perf_counter()
    result = smc(0)
    smc_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen = plain(0)
    plain_compile = time.perf_counter() - t0
    print(f"first runs (with compilation): SMC {smc_compile:.1f} s, plain {plain_compile:.1f} s")
    medians = interleaved_medians({"smc": smc, "plain": plain}, reps, seed=1)
    ratio = medians["smc"] / medians["plain"]
    out = tk.texts(result)
    ok = sum(valid(t) for t, _ in out)
    plain_texts = (
        [
            b"".join(vocab[int(t)] for t in row[:k] if int(t) != eos).decode("utf-8", "replace")
            for row, k in zip(np.asarray(gen.tokens), np.asarray(gen.lengths), strict=True)
        ]
        if hasattr(gen, "lengths")
        else []
    )
    plain_ok = sum(valid(t) for t in plain_texts)
    print(
        f"SMC   median {medians['smc']:.3f} s: {len(out)} particles of positive weight, {ok} valid "
        f"(jsonschema), log Ẑ {result.log_evidence:.2f}; top: {out[0][0] if out else None}"
    )
    print(
        f"plain median {medians['plain']:.3f} s: {plain_ok}/{len(plain_texts) or n} samples valid; "
        f"structured_over_plain = {ratio:.2f}"
    )
    if ok != len(out):
        raise SystemExit("a weighted particle is not valid under the schema")

    # 3. mask time per particle per token (ours: the batched gather on device)
    rng = np.random.default_rng(0)
    states = jnp.asarray(rng.integers(0, auto.num_states, n), jnp.int32)
    masks = jax.jit(jax.vmap(auto.allowed))
    jax.block_until_ready(masks(states))
    ours_us = median_us(lambda: jax.block_until_ready(masks(states)), 200) / n
    print(f"mask: ppinfer token automaton {ours_us:.3f} µs per particle per token (batch of {n} on device)")

    # 4. the other engines, same schema and vocabulary, along one valid document
    doc = (
        out[0][0]
        if out
        else json.dumps(
            {"name": "a", "kind": "class", "version": 1, "tags": [], "owner": {"id": 1, "active": True}}
        )
    )
    from ppinfer.constraints import _GreedyTokenizer

    doc_tokens = _GreedyTokenizer(vocab, eos)(doc.encode())
    rows = [
        ("ppinfer (token DFA, device)", compile_s, ours_us, 0.0, len(doc_tokens), "int per particle; free")
    ]
    for name, fn, state in [
        ("llguidance 1.9", engine_llguidance, "deep_copy per particle"),
        ("outlines-core 0.2", engine_outlines, "int per particle; free"),
        ("xgrammar 0.2", engine_xgrammar, "fork per particle"),
    ]:
        try:
            r = fn(vocab, eos, doc_tokens)
        except Exception as e:  # an engine not installed, or failing on this schema
            print(f"  {name}: skipped ({type(e).__name__}: {str(e)[:80]})")
            continue
        rows.append((name, r["compile_s"], r["mask_us"], r["copy_us"], r["followed"], state))
    print(
        f"{'engine':<30}{'compile s':>10}{'mask µs/token':>15}{'copy µs':>10}{'followed':>10}  "
        f"particle state on resampling  (document of {len(doc_tokens)} tokens)"
    )
    for name, c, m, cp, k, st in rows:
        print(f"{name:<30}{c:>10.3f}{m:>15.2f}{cp:>10.2f}{k:>10}  {st}")

    # 5. genlm-control
    speedup = float("nan")
    if opts.quick or opts.no_genlm:
        print("genlm-control: skipped (--quick / --no-genlm)")
    else:
        try:
            import genlm.control  # noqa: F401
        except ImportError as e:
            print(f"genlm-control: SKIPPED, not installed ({e}); install the peers extra to compare")
        else:
            import torch
            from _hf_export import export_gpt2

            torch.set_num_threads(opts.threads)
            with tempfile.TemporaryDirectory(prefix="ppinfer_hf_") as tmp:
                folder = export_gpt2(lm, Path(tmp) / "default_lm")
                run = genlm_runner(lm, folder, n, t_max)
                t0 = time.perf_counter()
                seqs = run(0)
                warm = time.perf_counter() - t0
                times = [warm]
                for seed in range(1, max(2, reps // 2)):
                    t0 = time.perf_counter()
                    seqs = run(seed)
                    times.append(time.perf_counter() - t0)
                g = statistics.median(times[1:])
                speedup = g / medians["smc"]
                print(
                    f"genlm-control AWRS × JsonSchema: median {g:.2f} s (first {warm:.1f} s), "
                    f"log Ẑ {float(seqs.log_ml):.2f}; torch threads {torch.get_num_threads()}; "
                    f"speedup_vs_genlm_json = {speedup:.2f}"
                )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    print(
        f"RESULT structured_over_plain={ratio:.3f} speedup_vs_genlm_json={speedup:.2f} "
        f"mask_us_per_token={ours_us:.3f}"
    )


if __name__ == "__main__":
    main()
