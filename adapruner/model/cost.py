"""Model cost measures for reports: parameters and multiply-accumulates of one forward pass."""

from __future__ import annotations

from torch import nn

from adapruner.model.families import text_config
from adapruner.model.structure import decoder_layers, layer_info


def macs(model: nn.Module, seq_len: int = 128) -> int:
    """MACs of one forward pass over `seq_len` tokens (the convention of LLM-Pruner's tables, via thop):
    seq_len × Σ (weights of every nn.Linear, lm_head included; of a MoE layer, top-k experts' weights and the router)
    + Σ_layers 2 · heads · head_dim · seq_len²
    (QKᵀ and attention·V over the full square). Embedding look-ups, norms and activations count zero."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = 0
    for index in range(len(decoder_layers(model))):
        info = layer_info(model, index)
        attention += 2 * info.n_heads * info.head_dim * seq_len * seq_len
        if info.experts is not None:  # each token runs top-k experts (3-D weights) and the router
            top_k = getattr(text_config(model.config), "num_experts_per_tok", 1)
            per_expert = sum(p[0].numel() for p in info.experts.parameters() if p.dim() == 3)
            router = sum(p.numel() for name, p in info.mlp.named_parameters() if name.startswith("gate."))
            linear += top_k * per_expert + router
    return seq_len * linear + attention
