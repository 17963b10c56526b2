"""Random-weight checkpoints of real model shapes, shared by ``bench_lm_real.py`` and ``gpu_check.py``.

:func:`write_checkpoint` writes a Hugging Face folder (``config.json`` + ``model.safetensors``, HF
tensor names and layouts) with seeded normal weights, so that ppinfer (``ppinfer.lm.load``) and
``transformers`` (``from_pretrained``) load exactly the same weights through their ordinary
loaders. Shapes:

- ``gpt2-124m``: GPT-2 small — vocab 50257, 12 layers, d = 768, 12 heads, MLP 3072, 1024 positions,
  tied embeddings (124.4M parameters);
- ``llama-1b``: Llama-3.2-1B's shape — vocab 128256, 16 layers, d = 2048, 32 query / 8 key-value
  heads of 64, MLP 8192, tied embeddings, RoPE θ = 500000 *without* Llama 3's RoPE scaling (ppinfer
  implements only plain RoPE; the cost is the same) (1.24B parameters).

``num_layers`` overrides the depth (``--quick`` runs use fewer layers). Weights are N(0, 0.02²)
(GPT-2's initialiser), norms 1, biases 0. The vocabulary is synthetic (:func:`synthetic_vocab`):
byte tokens, then distinct 2–3-character printable strings, EOS last — enough for regex
constraints, which only need every token's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SHAPES = ("gpt2-124m", "llama-1b")


def hf_config(shape: str, num_layers: int | None = None) -> dict:
    """The HF ``config.json`` dict of ``shape`` (see the module docstring)."""
    if shape == "gpt2-124m":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": 50257,
            "n_embd": 768,
            "n_layer": num_layers or 12,
            "n_head": 12,
            "n_inner": 3072,
            "n_positions": 1024,
            # gelu_new's function in torch's fused kernel (HF's gelu_new is unfused Python).
            "activation_function": "gelu_pytorch_tanh",
            "layer_norm_epsilon": 1e-5,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": True,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
        }
    if shape == "llama-1b":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 128256,
            "hidden_size": 2048,
            "num_hidden_layers": num_layers or 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "intermediate_size": 8192,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 128000,
            "eos_token_id": 128255,
        }
    raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def random_tensors(config: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Seeded random weights of an HF config dict, under HF's names and layouts, in ``dtype``."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= 0.02
        return out.astype(dtype, copy=False)

    def ones(*shape):
        return np.ones(shape, dtype)

    def zeros(*shape):
        return np.zeros(shape, dtype)

    out: dict[str, np.ndarray] = {}
    if config["model_type"] == "gpt2":
        d, f, v = config["n_embd"], config["n_inner"], config["vocab_size"]
        out["transformer.wte.weight"] = normal(v, d)
        out["transformer.wpe.weight"] = normal(config["n_positions"], d)
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = ones(d), zeros(d)
        for i in range(config["n_layer"]):
            h = f"transformer.h.{i}."
            out |= {
                h + "ln_1.weight": ones(d),
                h + "ln_1.bias": zeros(d),
                h + "ln_2.weight": ones(d),
                h + "ln_2.bias": zeros(d),
                h + "attn.c_attn.weight": normal(d, 3 * d),  # Conv1D: [in, out]
                h + "attn.c_attn.bias": zeros(3 * d),
                h + "attn.c_proj.weight": normal(d, d),
                h + "attn.c_proj.bias": zeros(d),
                h + "mlp.c_fc.weight": normal(d, f),
                h + "mlp.c_fc.bias": zeros(f),
                h + "mlp.c_proj.weight": normal(f, d),
                h + "mlp.c_proj.bias": zeros(d),
            }
        return out
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    out["model.embed_tokens.weight"] = normal(v, d)
    out["model.norm.weight"] = ones(d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {  # torch Linear: [out, in]
            p + "input_layernorm.weight": ones(d),
            p + "post_attention_layernorm.weight": ones(d),
            p + "self_attn.q_proj.weight": normal(q_out, d),
            p + "self_attn.k_proj.weight": normal(kv_out, d),
            p + "self_attn.v_proj.weight": normal(kv_out, d),
            p + "self_attn.o_proj.weight": normal(d, q_out),
            p + "mlp.gate_proj.weight": normal(f, d),
            p + "mlp.up_proj.weight": normal(f, d),
            p + "mlp.down_proj.weight": normal(d, f),
        }
    return out


def write_checkpoint(
    folder: str | Path,
    shape: str | dict,
    num_layers: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a random checkpoint into ``folder`` and return it. ``shape``: a name of
    :data:`SHAPES` or an HF config dict of the same keys (tests pass tiny ones); ``dtype``:
    ``"float32"`` or ``"bfloat16"``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(shape, num_layers) if isinstance(shape, str) else dict(shape)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    tensors = random_tensors(config, seed, np_dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": dtype}, indent=1))
    return folder


def synthetic_vocab(vocab_size: int) -> list[bytes]:
    """``vocab_size`` distinct byte strings: the 256 single bytes, then 2- and 3-character strings
    of printable ASCII (in base-95 order), and ``b"<|eos|>"`` as the last (EOS) token."""
    printable = [bytes([c]) for c in range(32, 127)]
    table = [bytes([b]) for b in range(256)]
    i = 0
    while len(table) < vocab_size - 1:
        digits, n = [], i
        while True:
            digits.append(printable[n % 95])
            n //= 95
            if n == 0:
                break
        token = b"".join(reversed(digits))
        if len(token) == 1:
            token = b" " + token
        table.append(token)
        i += 1
    return table[: vocab_size - 1] + [b"<|eos|>"]


def kv_bytes_per_token(config, itemsize: int) -> int:
    """Bytes of keys and values that one token adds to a particle's cache, for a ppinfer
    ``TransformerConfig``: ``2 · layers · kv_heads · head_dim · itemsize``."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


REGEX = r"[^eE]*"  # text that avoids the letter e, as in bench_lm_smc.py


def regex_smc(lm, vocab_bytes: list[bytes], prompt_ids, num_particles: int, max_new_tokens: int):
    """``run(seed) -> Result``: token-level SMC on ``lm`` under the regex :data:`REGEX` with the
    locally constrained proposal (the token program of ``bench_lm_smc.py``: the automaton state is
    particle state, ESS-adaptive resampling gathers every particle's KV cache). ``vocab_bytes``: the
    bytes of each token id (``len == lm.config.vocab_size``); EOS is ``lm.eos_id``."""
    import jax

    import ppinfer as pp
    from models.lm_programs import regex_init, regex_proposal, regex_step
    from ppinfer import tokens as tk
    from ppinfer.constraints import regex_automaton

    p = tk.prompt(lm, list(prompt_ids), max_new_tokens)
    automaton = regex_automaton(REGEX, vocab_bytes, lm.eos_id)
    program = pp.sequential(regex_init, regex_step, max_new_tokens)
    algorithm = pp.SMC(num_particles, proposal=regex_proposal)

    def run(seed):
        result = pp.infer(program, p, automaton, algorithm=algorithm, key=seed)
        jax.block_until_ready(result.log_weights)
        return result

    return run


def regex_ok(result, vocab_bytes: list[bytes], eos_id: int) -> bool:
    """Whether every particle of positive weight of a :func:`regex_smc` result avoids ``e``/``E``."""
    import numpy as np

    ctx = result.state[0]
    tokens, lengths = np.asarray(ctx.tokens), np.asarray(ctx.length)
    weights = np.asarray(result.weights)
    for row, n, w in zip(tokens, lengths, weights, strict=True):
        text = b"".join(vocab_bytes[t] for t in row[:n] if t != eos_id)
        if w > 0 and b"e" in text.lower():
            return False
    return True
