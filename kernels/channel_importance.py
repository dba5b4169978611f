"""Per-channel importance of one linear weight, for every metric of docs/metrics.md.

For W (out × in), gradient G, empirical-Fisher diagonal F and input-feature norms a (a_i = ‖x_i‖₂), the score of
channel j of dimension `dim` (0: row j, 1: column j) sums the per-element score over the other dimension:

    l1       Σ |W|              l2      Σ W²
    taylor1  Σ |W ⊙ G|          vector  |Σ W ⊙ G|
    taylor2  Σ ½ W² ⊙ F         mix     Σ |W ⊙ G − ½ W² ⊙ F|
    act      Σ |W| ⊙ a          (a broadcast along the input dimension)

All arithmetic is in fp32, whatever the input dtype. The Triton kernel streams W (and G, F, a as the metric
needs) once, tile by tile, and writes only the per-channel vector.
"""
from __future__ import annotations

import torch

from adapruner.kernels.dispatch import Backend, use_triton

METRICS_NEEDING: dict[str, frozenset[str]] = {
    "l1": frozenset(),
    "l2": frozenset(),
    "taylor1": frozenset({"grad"}),
    "vector": frozenset({"grad"}),
    "taylor2": frozenset({"fisher"}),
    "mix": frozenset({"grad", "fisher"}),
    "act": frozenset({"act_norm"}),
}


def channel_importance_torch(
    metric: str,
    weight: torch.Tensor,
    dim: int,
    grad: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    act_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch reference: 1-D fp32 scores over dimension `dim` of `weight` (the oracle of the kernel)."""
    _check_inputs(metric, weight, dim, grad, fisher, act_norm)
    w = weight.float()
    reduce_dim = 1 - dim
    if metric == "l1":
        element = w.abs()
    elif metric == "l2":
        element = w.square()
    elif metric == "taylor1":
        element = (w * grad.float()).abs()
    elif metric == "vector":
        return (w * grad.float()).sum(reduce_dim).abs()
    elif metric == "taylor2":
        element = 0.5 * w.square() * fisher.float()
    elif metric == "mix":
        element = (w * grad.float() - 0.5 * w.square() * fisher.float()).abs()
    else:  # act
        element = w.abs() * act_norm.float().unsqueeze(0)
    return element.sum(reduce_dim)


def channel_importance(
    metric: str,
    weight: torch.Tensor,
    dim: int,
    grad: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    act_norm: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Public entry point, contract of `channel_importance_torch`; Triton on CUDA tensors (see `dispatch`)."""
    if use_triton(weight, backend):
        return channel_importance_triton(metric, weight, dim, grad, fisher, act_norm)
    return channel_importance_torch(metric, weight, dim, grad, fisher, act_norm)


METRIC_CODES = {"l1": 0, "l2": 1, "taylor1": 2, "vector": 3, "taylor2": 4, "mix": 5, "act": 6}


def channel_importance_triton(
    metric: str,
    weight: torch.Tensor,
    dim: int,
    grad: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    act_norm: torch.Tensor | None = None,
    block_c: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton path: a program per (`block_c` channels, chunk of the reduced dimension), looping over its chunk in
    `block_k` tiles; the chunks' partial sums meet by atomic add (split-K keeps every SM busy when channels are few).

    Strided (non-contiguous) inputs are read in place: channel c, reduced index k sits at c·s_c + k·s_k. Unset
    launch options follow the layout (chosen from `bench.kernels --sweep` on an H200): reducing along contiguous
    memory, tiles of 4096 elements with the reduced run as long as possible and 8 warps; reducing across it, 64 × 64
    tiles with 4 warps.
    """
    from adapruner.kernels._channel_importance_kernel import channel_importance_kernel

    _check_inputs(metric, weight, dim, grad, fisher, act_norm)
    channels, reduced = weight.shape[dim], weight.shape[1 - dim]
    if weight.stride(1 - dim) == 1:
        run = min(4096, triton_next_power_of_2(reduced))
        default_c, default_k, default_warps = 4096 // run, run, 8
    else:
        default_c, default_k, default_warps = 64, 64, 4
    block_c, block_k, num_warps = block_c or default_c, block_k or default_k, num_warps or default_warps
    c_blocks = triton_cdiv(channels, block_c)
    split_k = split_k or max(1, min(triton_cdiv(reduced, 4 * block_k), triton_cdiv(4 * _multiprocessors(weight.device), c_blocks)))
    k_chunk = triton_cdiv(triton_cdiv(reduced, split_k), block_k) * block_k
    out = torch.zeros(channels, dtype=torch.float32, device=weight.device)
    # absent inputs get the weight as a stand-in pointer; the METRIC constexpr never reads them
    g = grad if grad is not None else weight
    f = fisher if fisher is not None else weight
    a = act_norm if act_norm is not None else weight
    grid = (c_blocks, triton_cdiv(reduced, k_chunk))
    channel_importance_kernel[grid](
        weight, g, f, a, out, channels, reduced, k_chunk,
        weight.stride(dim), weight.stride(1 - dim), g.stride(dim), g.stride(1 - dim), f.stride(dim), f.stride(1 - dim),
        a.stride(0) if act_norm is not None else 0,
        METRIC=METRIC_CODES[metric], ACT_ON_REDUCED=dim == 0, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out.abs_() if metric == "vector" else out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter runs programs one by one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _check_inputs(metric, weight, dim, grad, fisher, act_norm) -> None:
    if metric not in METRICS_NEEDING:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS_NEEDING)}")
    if weight.dim() != 2 or dim not in (0, 1):
        raise ValueError("weight must be 2-D (out × in) and dim 0 (rows) or 1 (columns)")
    given = {"grad": grad, "fisher": fisher, "act_norm": act_norm}
    for name in METRICS_NEEDING[metric]:
        tensor = given[name]
        if tensor is None:
            raise ValueError(f"metric {metric!r} needs {name}: collect calibration statistics first")
        expected = (weight.shape[1],) if name == "act_norm" else tuple(weight.shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
