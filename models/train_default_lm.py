"""Train ppinfer's embedded default language model and write ``models/default_lm``.

A small GPT-2 (byte-level BPE, 2048 tokens, digits split one per token) trained with JAX + optax
on text every machine has: a seeded subset of this Python's standard library sources, and the
synthetic step-by-step arithmetic corpus of ``models/arith_corpus.py``. Nothing is downloaded.

    python models/train_default_lm.py            # full run (≈15 min on 2 shared CPU cores)
    python models/train_default_lm.py --steps 20 --out /tmp/lm   # smoke test

The run is seeded; ``training_manifest.json`` records the corpus file list and its SHA-256, the
hyper-parameters and timings; ``README.md`` (the model card) reports held-out losses, bits per
byte and arithmetic accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arith_corpus import parse_answer, problems  # noqa: E402

from ppinfer.lm import config_from_hf, init_particle_cache, lm_step, load, prefill  # noqa: E402
from ppinfer.lm.transformer import sequence_logits  # noqa: E402

SEED = 0
EOS = "<|endoftext|>"
VOCAB_SIZE = 2048
CONTEXT = 128
HF_CONFIG = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": VOCAB_SIZE,
    "n_embd": 160,
    "n_layer": 4,
    "n_head": 4,
    "n_inner": 640,
    "n_positions": 256,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "tie_word_embeddings": True,
    "attn_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
}
NUM_STDLIB_FILES = 500
MAX_FILE_BYTES = 40_000
NUM_ARITH_TRAIN = 80_000
ARITH_SIZES = (2, 3, 4, 5)
EVAL_PER_SIZE = 100
HELDOUT_LABELS = {"stdlib": "stdlib (held-out files)", "arithmetic": "arithmetic (unseen problems)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "default_lm")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--arith-fraction", type=float, default=0.625)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    stdlib_train, stdlib_eval, file_list = stdlib_corpus()
    arith_train, arith_eval, eval_problems = arithmetic_corpus()
    tokenizer = train_tokenizer(stdlib_train + arith_train)
    tokenizer.save(str(args.out / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS)
    streams = {
        "stdlib": (
            encode_stream(tokenizer, stdlib_train, eos),
            encode_stream(tokenizer, stdlib_eval, eos),
        ),
        "arithmetic": (
            encode_stream(tokenizer, arith_train, eos),
            encode_stream(tokenizer, arith_eval, eos),
        ),
    }

    config = config_from_hf(HF_CONFIG)
    params, train_seconds, final_loss = train(config, streams, args)
    save_checkpoint(params, args.out)
    model = load(args.out)
    vocab_bytes = model.tokenizer.vocab_bytes
    heldout = {name: evaluate_loss(model, held, vocab_bytes) for name, (_, held) in streams.items()}
    accuracy, samples = evaluate_arithmetic(model, eval_problems)
    code_samples = model.complete(
        EOS + "def ", key=jax.random.key(1), num_particles=3, max_new_tokens=48, temperature=0.8
    )
    manifest = {
        "seed": SEED,
        "python": sys.version,
        "stdlib_root": sysconfig.get_paths()["stdlib"],
        "stdlib_files_train": file_list["train"],
        "stdlib_files_heldout": file_list["heldout"],
        "corpus_sha256": corpus_hash(stdlib_train, stdlib_eval, arith_train, arith_eval),
        "tokens": {
            name: {"train": int(tr.size), "heldout": int(ho.size)} for name, (tr, ho) in streams.items()
        },
        "hf_config": HF_CONFIG,
        "steps": args.steps,
        "batch": args.batch,
        "context": CONTEXT,
        "lr": args.lr,
        "arith_fraction": args.arith_fraction,
        "num_parameters": num_parameters(params),
        "train_seconds": train_seconds,
        "total_seconds": time.time() - started,
        "final_train_loss": final_loss,
        "heldout": heldout,
        "arithmetic_accuracy": accuracy,
    }
    (args.out / "training_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (args.out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos, "eos_token_id": eos}, indent=1) + "\n"
    )
    (args.out / "README.md").write_text(model_card(manifest, samples, code_samples))
    print(
        json.dumps(
            {k: manifest[k] for k in ("num_parameters", "train_seconds", "heldout", "arithmetic_accuracy")},
            indent=1,
        )
    )


def stdlib_corpus() -> tuple[list[str], list[str], dict[str, list[str]]]:
    """A seeded sorted subset of the standard library's ``.py`` files (tests excluded), split
    into training and held-out files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts
        and not any(part in ("test", "tests", "idle_test") for part in p.parts)
        and 0 < p.stat().st_size <= MAX_FILE_BYTES
    )
    chosen = sorted(random.Random(SEED).sample(candidates, min(NUM_STDLIB_FILES, len(candidates))))
    heldout = set(random.Random(SEED + 1).sample(chosen, len(chosen) // 20))
    split = {"train": [f for f in chosen if f not in heldout], "heldout": sorted(heldout)}
    read = lambda names: [(root / n).read_text(encoding="utf-8", errors="replace") for n in names]
    return read(split["train"]), read(split["heldout"]), split


def arithmetic_corpus():
    """Training texts, held-out texts and the accuracy problems; held-out expressions (loss and
    accuracy sets) never occur as training problems."""
    accuracy_set = []
    for size in ARITH_SIZES:
        distinct = {p.expression: p for p in problems(SEED + 3 + size, 20 * EVAL_PER_SIZE, (size,))}
        accuracy_set += random.Random(SEED + 2).sample(sorted(distinct.values(), key=str), EVAL_PER_SIZE)
    heldout = problems(SEED + 1, 2000, ARITH_SIZES)
    excluded = {p.expression for p in accuracy_set + heldout}
    train = [p for p in problems(SEED, NUM_ARITH_TRAIN, ARITH_SIZES) if p.expression not in excluded]
    return [p.text for p in train], [p.text for p in heldout], accuracy_set


def train_tokenizer(texts: list[str]) -> tokenizers.Tokenizer:
    """Byte-level BPE; digits are pre-split one per token so numbers are spelled digit by digit."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_stream(tokenizer: tokenizers.Tokenizer, texts: list[str], eos: int) -> np.ndarray:
    """One token stream: EOS, document, EOS, document, …"""
    ids = [[eos] + e.ids for e in tokenizer.encode_batch(texts)]
    return np.concatenate([np.asarray(x, np.int32) for x in ids] + [np.asarray([eos], np.int32)])


def init_params(config, key) -> dict:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers)."""
    d, f, n, v = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size
    keys = iter(jax.random.split(key, 16))
    normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, jnp.float32)
    resid = 0.02 / math.sqrt(2 * n)
    dense = lambda shape, std=0.02: {"w": normal(shape, std), "b": jnp.zeros((n, shape[-1]))}
    norm = lambda: {"scale": jnp.ones((n, d)), "bias": jnp.zeros((n, d))}
    return {
        "embed": normal((v, d)),
        "pos_embed": normal((config.max_position_embeddings, d), 0.01),
        "final_norm": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
        "layers": {
            "attn_norm": norm(),
            "mlp_norm": norm(),
            "q": dense((n, d, d)),
            "k": dense((n, d, d)),
            "v": dense((n, d, d)),
            "o": dense((n, d, d), resid),
            "up": dense((n, d, f)),
            "down": dense((n, f, d), resid),
        },
    }


def train(config, streams, args):
    """AdamW with warm-up and cosine decay on random windows from both corpora."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(100, args.steps // 10), args.steps, args.lr / 20
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.05))
    params = init_params(config, jax.random.key(SEED))
    opt_state = optimizer.init(params)

    def loss_fn(params, batch):
        logits = sequence_logits(params, config, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(SEED)
    stdlib, arith = streams["stdlib"][0], streams["arithmetic"][0]
    num_arith = round(args.batch * args.arith_fraction)
    started, losses = time.time(), []
    for step in range(args.steps):
        batch = np.concatenate([windows(rng, stdlib, args.batch - num_arith), windows(rng, arith, num_arith)])
        params, opt_state, loss = update(params, opt_state, batch)
        losses.append(loss)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {float(loss):.3f} {time.time() - started:.0f}s", flush=True)
    final_loss = float(np.mean(jax.device_get(losses[-50:])))
    return params, time.time() - started, final_loss


def windows(rng: np.random.Generator, stream: np.ndarray, count: int) -> np.ndarray:
    starts = rng.integers(0, stream.size - CONTEXT - 1, count)
    return np.stack([stream[s : s + CONTEXT + 1] for s in starts])


def save_checkpoint(params: dict, out: Path) -> None:
    """Write ``model.safetensors`` with transformers' GPT-2 tensor names (tied LM head)."""
    p = jax.tree.map(np.asarray, params)
    layers = p["layers"]
    tensors = {
        "transformer.wte.weight": p["embed"],
        "transformer.wpe.weight": p["pos_embed"],
        "transformer.ln_f.weight": p["final_norm"]["scale"],
        "transformer.ln_f.bias": p["final_norm"]["bias"],
    }
    for i in range(layers["q"]["w"].shape[0]):
        h = f"transformer.h.{i}."
        tensors |= {
            h + "ln_1.weight": layers["attn_norm"]["scale"][i],
            h + "ln_1.bias": layers["attn_norm"]["bias"][i],
            h + "ln_2.weight": layers["mlp_norm"]["scale"][i],
            h + "ln_2.bias": layers["mlp_norm"]["bias"][i],
            h + "attn.c_attn.weight": np.concatenate([layers[n]["w"][i] for n in "qkv"], axis=1),
            h + "attn.c_attn.bias": np.concatenate([layers[n]["b"][i] for n in "qkv"]),
            h + "attn.c_proj.weight": layers["o"]["w"][i],
            h + "attn.c_proj.bias": layers["o"]["b"][i],
            h + "mlp.c_fc.weight": layers["up"]["w"][i],
            h + "mlp.c_fc.bias": layers["up"]["b"][i],
            h + "mlp.c_proj.weight": layers["down"]["w"][i],
            h + "mlp.c_proj.bias": layers["down"]["b"][i],
        }
    tensors = {name: np.ascontiguousarray(t, np.float32) for name, t in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(HF_CONFIG, indent=1) + "\n")


def evaluate_loss(model, stream: np.ndarray, vocab_bytes: list[bytes]) -> dict[str, float]:
    """Held-out loss (nats/token) and bits per byte over non-overlapping windows."""
    count = (stream.size - 1) // CONTEXT
    inputs = stream[: count * CONTEXT].reshape(count, CONTEXT)
    targets = stream[1 : count * CONTEXT + 1].reshape(count, CONTEXT)
    nll = jax.jit(
        lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
            sequence_logits(p, model.config, x), y
        ).sum(),
    )
    total = sum(
        float(nll(model.params, inputs[i : i + 32], targets[i : i + 32])) for i in range(0, count, 32)
    )
    num_bytes = sum(len(vocab_bytes[t]) for t in targets.ravel())
    return {"loss": total / targets.size, "bits_per_byte": total / num_bytes / math.log(2)}


def evaluate_arithmetic(model, eval_problems, max_new_tokens: int = 64):
    """Accuracy by problem size of the greedy answer and of one sampled answer (temperature 1)."""
    tok = model.tokenizer
    prompts = [[model.eos_id] + tok.encode(p.question) for p in eval_problems]
    width = max(map(len, prompts))
    padded = np.asarray([p + [0] * (width - len(p)) for p in prompts], np.int32)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    results, samples = {}, []
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        keys = jax.random.split(jax.random.key(SEED + 7), len(prompts))
        tokens = complete_batch(
            model.params, model.config, padded, lengths, keys, max_new_tokens, temperature
        )
        texts = [
            tok.decode(row[: list(row).index(model.eos_id)] if model.eos_id in row else row)
            for row in np.asarray(tokens)
        ]
        by_size: dict[int, list[bool]] = {}
        for problem, text in zip(eval_problems, texts, strict=True):
            by_size.setdefault(problem.size, []).append(parse_answer(text) == problem.solve()[1])
            if name == "greedy" and len(by_size[problem.size]) <= 2:
                samples.append(problem.question + text)
        results[name] = {size: float(np.mean(ok)) for size, ok in sorted(by_size.items())}
    return results, samples


@jax.jit(static_argnums=(1, 5, 6))
def complete_batch(params, config, prompts, lengths, keys, max_new_tokens, temperature):
    """Continuations i32[P, T] of P different prompts (right-padded i32[P, Lp], lengths i32[P])."""

    def one(prompt, length, key):
        logits, prompt_cache = prefill(params, config, prompt, length)
        cache = jax.tree.map(lambda x: x[0], init_particle_cache(config, 1, max_new_tokens))

        def body(carry, key):
            logits, cache = carry
            if temperature == 0.0:
                token = jnp.argmax(logits).astype(jnp.int32)
            else:
                token = jax.random.categorical(key, logits / temperature).astype(jnp.int32)
            logits, cache = lm_step(params, config, prompt_cache, cache, token)
            return (logits, cache), token

        _, tokens = jax.lax.scan(body, (logits[length - 1], cache), jax.random.split(key, max_new_tokens))
        return tokens

    return jax.vmap(one)(prompts, lengths, keys)


def corpus_hash(*parts: list[str]) -> str:
    digest = hashlib.sha256()
    for texts in parts:
        for text in texts:
            digest.update(text.encode("utf-8", errors="replace"))
            digest.update(b"\0")
    return digest.hexdigest()


def num_parameters(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def model_card(manifest: dict, samples: list[str], code_samples: list[str]) -> str:
    acc = manifest["arithmetic_accuracy"]
    rows = "\n".join(
        f"| {size} | {acc['greedy'][size]:.2f} | {acc['sampled'][size]:.2f} |" for size in acc["greedy"]
    )
    heldout_rows = "\n".join(
        f"| {HELDOUT_LABELS[name]} | {m['loss']:.3f} | {m['bits_per_byte']:.3f} |"
        for name, m in manifest["heldout"].items()
    )
    hf = manifest["hf_config"]
    code = "\n\n".join(f"```python\ndef {s}\n```" for s in code_samples)
    arith = "\n".join(f"    {s}" for s in samples)
    return f"""# ppinfer default language model

A small GPT-2 trained by `models/train_default_lm.py` (JAX + optax, CPU, seed {manifest["seed"]})
so that ppinfer's token-level programs and tests run offline. Not a useful general model: it
knows some Python-stdlib-flavoured code and a step-by-step arithmetic format.

- Architecture: GPT-2, {hf["n_layer"]} layers, width {hf["n_embd"]}, {hf["n_head"]} heads,
  MLP {hf["n_inner"]}, context {hf["n_positions"]} (trained on windows of {manifest["context"]}),
  tied embeddings; **{manifest["num_parameters"]:,} parameters** (fp32 safetensors).
- Tokenizer: byte-level BPE, {hf["vocab_size"]} tokens, digits split one per token;
  `<|endoftext|>` (id 0) is EOS and separates documents (prefix a prompt with it).
- Training: {manifest["steps"]} steps × {manifest["batch"]} windows of {manifest["context"]} tokens
  ({manifest["arith_fraction"]:.0%} arithmetic, the rest stdlib), AdamW,
  peak lr {manifest["lr"]}, cosine decay;
  **{manifest["train_seconds"] / 60:.1f} min** of training ({manifest["total_seconds"] / 60:.1f} min
  in all with data, tokenizer and evaluation) on 2 CPU cores; final train loss
  {manifest["final_train_loss"]:.3f}.
- Data (generated or read at training time, never downloaded): {len(manifest["stdlib_files_train"])}
  `.py` files of the Python {manifest["python"].split()[0]} standard library (a seeded sorted
  subset, tests excluded; {len(manifest["stdlib_files_heldout"])} more files held out) and
  {manifest["tokens"]["arithmetic"]["train"]:,} tokens of arithmetic problems from
  `models/arith_corpus.py`. File lists and the corpus SHA-256 are in `training_manifest.json`.

## Held-out evaluation

| corpus | loss (nats/token) | bits per byte |
|---|---|---|
{heldout_rows}

Arithmetic accuracy ({EVAL_PER_SIZE} unseen problems per size; prompt `<|endoftext|>Q: … = ?`,
up to 64 new tokens, answer parsed after `A:`):

| operands | greedy | sampled (T=1) |
|---|---|---|
{rows}

## Samples

Greedy arithmetic:

{arith}

Code, prompt `<|endoftext|>def `, temperature 0.8:

{code}

## Use

```python
from ppinfer.lm import load_default
lm = load_default()
lm.complete("<|endoftext|>Q: 12+7 = ?", temperature=0.0)
```

The folder is a plain Hugging Face checkpoint: `GPT2LMHeadModel.from_pretrained` loads it too.
"""


if __name__ == "__main__":
    main()
