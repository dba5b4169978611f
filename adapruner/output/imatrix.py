"""An importance matrix for llama.cpp's quantizer, from calibration windows (`imatrix_of`).

For every 2-D weight the quantizer reads, llama.cpp weighs each input column's rounding error by the mean square of
that column's input over calibration text: imatrix[name][j] = mean over tokens of x_j² — what llama.cpp's own
`llama-imatrix` tool collects (its `in_sum2 / counts`), here from a forward of the model in transformers. The names
are the GGUF tensors' (`blk.N.attn_q`, …); MoE experts, the embeddings and the output head get none (llama.cpp
quantizes them without one).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from adapruner.model.structure import decoder_layers, layer_info


@torch.no_grad()
def imatrix_of(model: nn.Module, windows: torch.Tensor, fused: tuple[str, ...] = (), batch_size: int = 8) -> dict:
    """{GGUF tensor name (with `.weight`): float32 [in_features]} of every dense attention and MLP projection of
    `model`, from `windows` [N, T]; `fused`: the architecture writes `attn_qkv` / an `ffn_up` of [gate; up] rows."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def collect(names: tuple[str, ...]):
        def hook(_module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            for name in names:
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for index in range(len(decoder_layers(model))):
        info, b = layer_info(model, index), f"blk.{index}"
        f = info.family
        attention = ("attn_qkv",) if "qkv" in fused else ("attn_q", "attn_k", "attn_v")
        mlp = ("ffn_up",) if "gate_up" in fused else ("ffn_gate", "ffn_up")
        watched = []
        if info.n_heads:
            watched += [
                (getattr(info.attn, f.attention_inputs[0]), attention),
                (getattr(info.attn, f.o), ("attn_output",)),
            ]
        if info.experts is None and info.intermediate:
            watched += [(getattr(info.mlp, f.mlp_inputs[0]), mlp), (getattr(info.mlp, f.down), ("ffn_down",))]
        for module, names in watched:
            hooks.append(module.register_forward_pre_hook(collect(tuple(f"{b}.{n}.weight" for n in names))))
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (sums[name] / counts[name]).cpu().numpy().astype(np.float32) for name in sums}
