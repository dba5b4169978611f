"""Model shapes for the cost benchmarks: the embedded SmolLM2 or a LLaMA-shaped model with random weights.

A random-weight model (no download) is built from a config on the target device: the timing of pruning,
caching and scoring depends on the widths, not on what the weights learned. Its calibration and validation
windows are seeded random token ids (pool "random").
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from adapruner.data.calibration import pool_windows
from adapruner.scoring.cache import candidate_pool

# hidden, layers, query heads, kv heads, MLP width, vocabulary
RANDOM_SHAPES = {
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "tinyllama-1b": (2048, 22, 32, 4, 5632, 32000),
    "llama-7b": (4096, 32, 32, 32, 11008, 32000),
}
SHAPES = ("smollm2", *RANDOM_SHAPES)  # smollm2: the real embedded model and real text pools


def random_llama(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0, vocab: int | None = None):
    """A LlamaForCausalLM of `shape` with HF's random initialisation, built directly on `device` in `dtype` (with a
    `vocab`ulary of that size instead of the shape's: another tokenizer's)."""
    hidden, layers, heads, kv_heads, intermediate, shape_vocab = RANDOM_SHAPES[shape]
    vocab = vocab or shape_vocab
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_shape(shape: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer or None) for `shape`."""
    if shape == "smollm2":
        from adapruner.model.models import load_model

        return load_model("smollm2", dtype, device)
    return random_llama(shape, device, dtype), None


def bench_windows(
    shape: str, tokenizer, pools: list[str], pool_size: int, seq_len: int, val_windows: int, seed: int = 0
):
    """(candidate-pool ids, their addresses, validation ids): real text for smollm2, seeded random ids otherwise."""
    if shape == "smollm2":
        ids, addresses = candidate_pool(tokenizer, pools, pool_size, seq_len, seed)
        return ids, addresses, pool_windows(tokenizer, "wiki", seq_len, "val")[:val_windows]
    vocab = RANDOM_SHAPES[shape][5]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (pool_size + val_windows, seq_len), generator=generator)
    return ids[:pool_size], [("random", k) for k in range(pool_size)], ids[pool_size:]
