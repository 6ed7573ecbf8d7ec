"""Tiny Hugging Face configs, the one place the tests take them from: two layers, built in milliseconds.

Each is transformers' own config class; a test passes as overrides only what it needs to differ
(``num_labels``, ``tie_word_embeddings``). transformers is imported when a config is asked for.
"""

from __future__ import annotations

from typing import Any

_FIELDS: dict[str, dict[str, Any]] = {
    "BertConfig": {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 24,
        "max_position_embeddings": 32,
    },
    # token ids inside the small vocabulary: save_pretrained checks the generation config's
    "GPT2Config": {"n_layer": 2, "n_head": 2, "n_embd": 16, "vocab_size": 64, "n_positions": 32}
    | {"bos_token_id": 0, "eos_token_id": 0},
    # grouped-query attention: 4 heads, 2 key-value heads
    "LlamaConfig": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    },
}


def _tiny(name: str, overrides: dict[str, Any]) -> Any:
    import transformers

    return getattr(transformers, name)(**{**_FIELDS[name], **overrides})


def tiny_bert_config(**overrides: Any) -> Any:
    """A two-layer BERT."""
    return _tiny("BertConfig", overrides)


def tiny_gpt2_config(**overrides: Any) -> Any:
    """A two-layer GPT-2 (its head tied to the token embedding, as GPT-2's is)."""
    return _tiny("GPT2Config", overrides)


def tiny_llama_config(**overrides: Any) -> Any:
    """A two-layer Llama."""
    return _tiny("LlamaConfig", overrides)
