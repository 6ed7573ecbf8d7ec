"""Tiny Hugging Face configs, the one place the tests take them from: two layers, built in milliseconds.

Each is transformers' own config class; a test passes as overrides only what it needs to differ
(``num_labels``, ``tie_word_embeddings``). transformers is imported when a config is asked for.
"""

from __future__ import annotations

from typing import Any


def tiny_bert_config(**overrides: Any) -> Any:
    """A two-layer BERT."""
    from transformers import BertConfig

    fields: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 24,
        "max_position_embeddings": 32,
    }
    return BertConfig(**{**fields, **overrides})


def tiny_gpt2_config(**overrides: Any) -> Any:
    """A two-layer GPT-2 (its head tied to the token embedding, as GPT-2's is)."""
    from transformers import GPT2Config

    # token ids inside the small vocabulary: save_pretrained checks the generation config's
    fields: dict[str, Any] = {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 16,
        "vocab_size": 64,
        "n_positions": 32,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    return GPT2Config(**{**fields, **overrides})


def tiny_llama_config(**overrides: Any) -> Any:
    """A two-layer Llama with grouped-query attention (4 heads, 2 key-value heads)."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    return LlamaConfig(**{**fields, **overrides})
