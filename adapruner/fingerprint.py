"""Content digests that key stored state (activation caches, validation windows, studies) to what produced it.

model: sha256 over the config (JSON, less where it was read from, the transformers version and the attention
    implementation), the tokenizer's vocabulary and special tokens, and for every parameter and
    buffer its name, shape, dtype, the exact values of an evenly strided sample of at most `SAMPLED` of its
    elements (read as fp32 on the host) and its fp64 sum to 7 significant digits. The same weights give the same
    digest on any device; any retrained or edited model (every weight moves) gives another.
text: sha256 of a pool's documents (the calibration split of `wiki`), joined as calibration joins them.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from adapruner.data.corpora import Split, pool_documents
from adapruner.model.big_model import unique_tensors, weights

UNHASHED_CONFIG = frozenset(
    {"transformers_version", "_name_or_path", "_attn_implementation", "_commit_hash", "dtype", "torch_dtype"}
)  # not the model
SAMPLED = 4096  # elements of each tensor whose exact values enter the model digest
DIGEST_CHARS = 16


def model_digest(model: nn.Module, tokenizer) -> str:
    """Digest of the weights, config and tokenizer of a loaded model (see the module docstring)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in UNHASHED_CONFIG}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps([vocab, sorted(map(str, tokenizer.all_special_tokens))]).encode())
    with torch.no_grad():
        for name, _ in unique_tensors(model, buffers=True):
            owner_name, _, leaf = name.rpartition(".")
            with weights(model.get_submodule(owner_name)) as owner:  # an offloaded tensor is read from where it lives
                tensor = getattr(owner, leaf)
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // SAMPLED)].float().cpu()
                total = flat.sum(dtype=torch.float64).item() if tensor.is_floating_point() else int(flat.sum().item())
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total:.7g}|".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:DIGEST_CHARS]


def text_digest(pool: str, split: Split = "calib") -> str:
    """Digest of the documents of one split of a pool (built-in or a user's file/dataset)."""
    return hashlib.sha256("\n\n".join(pool_documents(pool, split)).encode()).hexdigest()[:DIGEST_CHARS]
