"""Tiny random models and a word-level tokenizer for unit tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_llama(n_heads: int = 4, n_kv: int = 4, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """A random LLaMA with head_dim 8, hidden 48, intermediate 24, vocab 97 (odd sizes on purpose)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """A random Qwen2 (q/k/v biases), GQA 6 query / 2 kv heads."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases so that a wrong bias slice shows in the logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return model


def word_level_tokenizer():
    """A 97-token word-level tokenizer ("t0" … "t96") so that tiny models save and load like real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0")


def span(layers: range) -> str:
    """A layer range as the START:STOP text a `PruneSpec` holds."""
    return f"{layers.start}:{layers.stop}"
