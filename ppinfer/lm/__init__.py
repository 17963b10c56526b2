"""The language-model layer: a JAX transformer (GPT-2, Llama, Qwen2/3, Mistral, Mixtral, Phi-3,
Gemma 2/3) with a particle KV cache, Hugging Face checkpoint loading, tokenizers with byte-level
vocabularies and chat templates, an exact n-gram LM, and the small embedded default model
(:func:`load_default`)."""

from ppinfer.lm.chat import ChatTemplates, render_template
from ppinfer.lm.checkpoint import load_params, read_config
from ppinfer.lm.config import TransformerConfig, config_from_hf
from ppinfer.lm.model import Generation, LanguageModel, load, load_default
from ppinfer.lm.ngram import NGramCache, NGramLM
from ppinfer.lm.tokenizer import Tokenizer
from ppinfer.lm.transformer import (
    ParticleCache,
    PromptCache,
    decode,
    init_particle_cache,
    lm_step,
    prefill,
    sequence_logits,
)

__all__ = [
    "ChatTemplates",
    "Generation",
    "LanguageModel",
    "NGramCache",
    "NGramLM",
    "ParticleCache",
    "PromptCache",
    "Tokenizer",
    "TransformerConfig",
    "config_from_hf",
    "decode",
    "init_particle_cache",
    "lm_step",
    "load",
    "load_default",
    "load_params",
    "prefill",
    "read_config",
    "render_template",
    "sequence_logits",
]
