"""Per-channel importance of one linear weight, for every metric of docs/metrics.md.

For W (out × in), gradient G, empirical-Fisher diagonal F and input-feature norms a (a_i = ‖x_i‖₂), the score of
channel j of dimension `dim` (0: row j, 1: column j) sums the per-element score over the other dimension:

    l1       Σ |W|              l2      Σ W²
    taylor1  Σ |W ⊙ G|          vector  |Σ W ⊙ G|
    taylor2  Σ ½ W² ⊙ F         mix     Σ |W ⊙ G − ½ W² ⊙ F|
    act      Σ |W| ⊙ a          fluct   Σ W² ⊙ v   (a, v: input-feature norms / variances, broadcast along rows)

The per-element formulas live in `adapruner.scoring.metrics` (the registry); this module reduces them.

All arithmetic is in fp32, whatever the input dtype. The Triton kernel streams W (and G, F, a as the metric
needs) once, tile by tile, and writes only the per-channel vector.
"""

from __future__ import annotations

import torch

from adapruner.kernels.dispatch import Backend, use_triton
from adapruner.scoring.metrics import INPUT_STATS, KERNEL_METRICS, METRICS


def channel_importance_torch(
    metric: str,
    weight: torch.Tensor,
    dim: int,
    grad: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    act_norm: torch.Tensor | None = None,
    act_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch reference: 1-D fp32 scores over dimension `dim` of `weight` (the oracle of the kernel)."""
    _check_inputs(metric, weight, dim, grad=grad, fisher=fisher, act_norm=act_norm, act_var=act_var)
    spec = METRICS[metric]
    element = spec.element(weight.float(), grad=grad, fisher=fisher, act_norm=act_norm, act_var=act_var)
    scores = element.sum(1 - dim)
    return scores.abs() if spec.sum_then_abs else scores


def channel_importance(
    metric: str,
    weight: torch.Tensor,
    dim: int,
    grad: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    act_norm: torch.Tensor | None = None,
    backend: Backend = "auto",
    act_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Public entry point, contract of `channel_importance_torch`; Triton on CUDA tensors for the metrics the
    kernel computes (see `dispatch`)."""
    if metric in KERNEL_METRICS and use_triton(weight, backend):
        return channel_importance_triton(metric, weight, dim, grad, fisher, act_norm)
    return channel_importance_torch(metric, weight, dim, grad, fisher, act_norm, act_var)


def channel_importance_triton(
    metric: str,
    weight: torch.Tensor,
    dim: int,
    grad: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    act_norm: torch.Tensor | None = None,
    **launch: int,
) -> torch.Tensor:
    """Triton path: a program per (`block_c` channels, chunk of the reduced dimension), looping over its chunk in
    `block_k` tiles; the chunks' partial sums meet by atomic add (split-K keeps every SM busy when channels are few).

    Strided (non-contiguous) inputs are read in place: channel c, reduced index k sits at c·s_c + k·s_k. Unset
    launch options follow the layout (chosen from `bench.kernels --sweep` on an H200): reducing along contiguous
    memory, tiles of 4096 elements with the reduced run as long as possible and 8 warps; reducing across it, 64 × 64
    tiles with 4 warps. `launch` may set `block_c`, `block_k`, `split_k` and `num_warps`.
    """
    from adapruner.kernels._channel_importance_kernel import channel_importance_kernel

    if metric not in KERNEL_METRICS:
        raise ValueError(f"the kernel computes {', '.join(KERNEL_METRICS)}, not {metric!r}")
    _check_inputs(metric, weight, dim, grad=grad, fisher=fisher, act_norm=act_norm)
    channels, reduced = weight.shape[dim], weight.shape[1 - dim]
    if weight.stride(1 - dim) == 1:
        run = min(4096, triton_next_power_of_2(reduced))
        default_c, default_k, default_warps = 4096 // run, run, 8
    else:
        default_c, default_k, default_warps = 64, 64, 4
    unknown = set(launch) - {"block_c", "block_k", "split_k", "num_warps"}
    if unknown:
        raise TypeError(f"unknown launch options {sorted(unknown)}: use block_c, block_k, split_k, num_warps")
    block_c, block_k = launch.get("block_c") or default_c, launch.get("block_k") or default_k
    num_warps, split_k = launch.get("num_warps") or default_warps, launch.get("split_k")
    c_blocks = triton_cdiv(channels, block_c)
    split_k = split_k or max(
        1, min(triton_cdiv(reduced, 4 * block_k), triton_cdiv(4 * _multiprocessors(weight.device), c_blocks))
    )
    k_chunk = triton_cdiv(triton_cdiv(reduced, split_k), block_k) * block_k
    out = torch.zeros(channels, dtype=torch.float32, device=weight.device)
    # absent inputs get the weight as a stand-in pointer; the METRIC constexpr never reads them
    g = grad if grad is not None else weight
    f = fisher if fisher is not None else weight
    a = act_norm if act_norm is not None else weight
    grid = (c_blocks, triton_cdiv(reduced, k_chunk))
    channel_importance_kernel[grid](
        weight,
        g,
        f,
        a,
        out,
        channels,
        reduced,
        k_chunk,
        weight.stride(dim),
        weight.stride(1 - dim),
        g.stride(dim),
        g.stride(1 - dim),
        f.stride(dim),
        f.stride(1 - dim),
        a.stride(0) if act_norm is not None else 0,
        METRIC=METRICS[metric].kernel_code,
        ACT_ON_REDUCED=dim == 0,
        BLOCK_C=block_c,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out.abs_() if METRICS[metric].sum_then_abs else out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter runs programs one by one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _check_inputs(metric: str, weight: torch.Tensor, dim: int, **stats: torch.Tensor | None) -> None:
    if metric not in METRICS or METRICS[metric].element is None:
        scored = [name for name, m in METRICS.items() if m.element is not None]
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(scored)}")
    if weight.dim() != 2 or dim not in (0, 1):
        raise ValueError("weight must be 2-D (out × in) and dim 0 (rows) or 1 (columns)")
    for name in METRICS[metric].needs:
        tensor = stats.get(name)
        if tensor is None:
            raise ValueError(f"metric {metric!r} needs {name}: collect calibration statistics first")
        expected = (weight.shape[1],) if name in INPUT_STATS else tuple(weight.shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
