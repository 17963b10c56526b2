"""Export a ppinfer GPT-2 :class:`~ppinfer.lm.LanguageModel` to a local Hugging Face folder.

The inverse of :func:`ppinfer.lm.checkpoint.load_params` for ``arch == "gpt2"``: the params pytree
(per-layer tensors stacked on a leading layer axis; q/k/v split) becomes ``GPT2LMHeadModel``
tensors (``transformer.h.{i}.attn.c_attn.weight: [d, 3d]`` with q|k|v fused, Conv1D ``[in, out]``
weights, tied ``lm_head``), written with a ``config.json``, the ``tokenizer.json`` of the model and
a ``tokenizer_config.json`` so that ``transformers``' ``AutoModelForCausalLM`` and
``AutoTokenizer`` load the folder offline. Used by ``bench_lm_peers.py`` to give the peer
libraries (llamppl, genlm-control) exactly the checkpoint ppinfer runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ppinfer.errors import CheckpointError
from ppinfer.lm import LanguageModel


def gpt2_tensors(lm: LanguageModel) -> dict[str, np.ndarray]:
    """The HF ``GPT2LMHeadModel`` state dict (``transformer.``-prefixed names, float32 numpy) of a
    GPT-2 ``lm``. Raises :class:`CheckpointError` for a non-GPT-2 model."""
    config = lm.config
    if config.arch != "gpt2":
        raise CheckpointError(
            f"only GPT-2 models can be exported to the HF GPT-2 layout, got {config.arch!r}"
        )
    params = _numpy(lm.params)
    layers = params["layers"]
    out = {
        "transformer.wte.weight": params["embed"],
        "transformer.wpe.weight": params["pos_embed"],
        "transformer.ln_f.weight": params["final_norm"]["scale"],
        "transformer.ln_f.bias": params["final_norm"]["bias"],
    }
    for i in range(config.num_layers):
        prefix = f"transformer.h.{i}."
        qkv_w = np.concatenate([layers[k]["w"][i] for k in ("q", "k", "v")], axis=-1)  # [d, 3d]
        qkv_b = np.concatenate([layers[k]["b"][i] for k in ("q", "k", "v")], axis=-1)  # [3d]
        out |= {
            prefix + "ln_1.weight": layers["attn_norm"]["scale"][i],
            prefix + "ln_1.bias": layers["attn_norm"]["bias"][i],
            prefix + "ln_2.weight": layers["mlp_norm"]["scale"][i],
            prefix + "ln_2.bias": layers["mlp_norm"]["bias"][i],
            prefix + "attn.c_attn.weight": qkv_w,
            prefix + "attn.c_attn.bias": qkv_b,
            prefix + "attn.c_proj.weight": layers["o"]["w"][i],
            prefix + "attn.c_proj.bias": layers["o"]["b"][i],
            prefix + "mlp.c_fc.weight": layers["up"]["w"][i],
            prefix + "mlp.c_fc.bias": layers["up"]["b"][i],
            prefix + "mlp.c_proj.weight": layers["down"]["w"][i],
            prefix + "mlp.c_proj.bias": layers["down"]["b"][i],
        }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = params["lm_head"].T  # JAX multiplies x @ w with w: [d, V]
    return {name: np.ascontiguousarray(array, np.float32) for name, array in out.items()}


def gpt2_config(lm: LanguageModel) -> dict:
    """The HF ``config.json`` dict of a GPT-2 ``lm``. The activation is written as
    ``gelu_pytorch_tanh`` — the same function as GPT-2's ``gelu_new`` (tanh approximation), in
    torch's fused kernel, so the peers are not slowed by HF's Python ``gelu_new``."""
    c = lm.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_embd": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_heads,
        "n_inner": c.intermediate_size,
        "n_positions": c.max_position_embeddings,
        "activation_function": "gelu_pytorch_tanh",
        "layer_norm_epsilon": c.norm_eps,
        "bos_token_id": c.bos_token_id if c.bos_token_id is not None else lm.eos_id,
        "eos_token_id": lm.eos_id,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "torch_dtype": "float32",
    }


def export_gpt2(lm: LanguageModel, folder: str | Path) -> Path:
    """Write ``lm`` (GPT-2, with a tokenizer) as a HF checkpoint folder: ``config.json``,
    ``generation_config.json``, ``model.safetensors`` (float32), ``tokenizer.json`` and
    ``tokenizer_config.json`` (the fast tokenizer exactly as ppinfer uses it, EOS
    ``<|endoftext|>``). Returns the folder. Raises :class:`CheckpointError` for a non-GPT-2 model
    or one without a tokenizer."""
    if lm.tokenizer is None:
        raise CheckpointError("the model has no tokenizer to export")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(gpt2_tensors(lm), folder / "model.safetensors", metadata={"format": "pt"})
    config = gpt2_config(lm)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=1))
    lm.tokenizer.backend.save(str(folder / "tokenizer.json"))
    eos = lm.tokenizer.backend.id_to_token(lm.eos_id) if lm.eos_id is not None else None
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as is (digits split, BPE)
        "model_max_length": lm.config.max_position_embeddings,
        "eos_token": eos,
        "bos_token": eos,
        "unk_token": eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return folder


def _numpy(tree):
    if isinstance(tree, dict):
        return {key: _numpy(value) for key, value in tree.items()}
    return np.asarray(tree, np.float32)
