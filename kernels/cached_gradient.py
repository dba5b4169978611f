"""Importance from cached activations X (tokens × in) and output gradients dY (tokens × out) of a linear W.

For a subset S of samples, given as token rows (each sample `seq_len` consecutive rows), G_s = dY_sᵀ X_s and
G = Σ_{s∈S} G_s (out × in). Per channel:
    taylor1  rows: Σ_i |W_ji G_ji|                cols: Σ_j |W_ji G_ji|
    mix      rows: Σ_i |W_ji G_ji − ½ W_ji² F_ji|  cols: likewise over j,  F = (1/|S|) Σ_{s∈S} G_s²
The Triton kernel is a matmul whose epilogue reduces into the row and column vectors: neither G nor F ever
reaches global memory. For `mix` each sample's tile G_s is completed in registers, then added to G and,
squared, to F: the same FLOPs as taylor1.

Per-sample Fisher statistic, computed once when a cache is built (samples are consecutive blocks of
`seq_len` token rows, G_s = dY_sᵀ X_s):
    rows: f_sj = Σ_i W_ji² (G_s)_ji²     cols: f_si = Σ_j W_ji² (G_s)_ji²
so that any subset S has taylor2 score ½ Σ_{s∈S} f_s / |S| (the empirical Fisher F = mean_s G_s²).
"""

from __future__ import annotations

import os

import torch

from adapruner.kernels.dispatch import Backend, native_bf16, use_triton
from adapruner.scoring.metrics import ACTIVATION_METRICS, METRICS


def _with_fisher(metric: str) -> bool:
    """Whether the cached-gradient score subtracts the ½ W²⊙F term (the metric needs the Fisher)."""
    return "fisher" in METRICS[metric].needs


def _check(weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> None:
    if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError("x (tokens × in) and dy (tokens × out) must be 2-D with the same number of token rows")
    if tuple(weight.shape) != (dy.shape[1], x.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} does not match dy/x widths ({dy.shape[1]}, {x.shape[1]})")


def _check_rows(rows: torch.Tensor, n_tokens: int) -> None:
    if rows.numel() == 0:
        raise ValueError("the subset is empty: choose at least one sample")
    if rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1:
        raise ValueError("rows must be a 1-D integer tensor of token-row indices")
    if int(rows.min()) < 0 or int(rows.max()) >= n_tokens:
        raise ValueError(f"token-row indices must lie in [0, {n_tokens})")


def cached_grad_importance_torch(
    metric: str, weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, rows: torch.Tensor, seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: materialise G (and for mix the per-sample G_s) in fp32; return (row scores, column scores)."""
    _check_importance_call(metric, weight, x, dy, rows, seq_len)
    w = weight.float()
    if not _with_fisher(metric):
        element = (w * (dy[rows].float().t() @ x[rows].float())).abs()
    else:
        n = rows.numel() // seq_len
        per_sample = torch.bmm(
            dy[rows].float().view(n, seq_len, -1).transpose(1, 2), x[rows].float().view(n, seq_len, -1)
        )
        element = (w * per_sample.sum(0) - 0.5 * w.square() * per_sample.square().mean(0)).abs()
    return element.sum(1), element.sum(0)


def cached_grad_importance_bf16_cpu(
    metric: str, weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, rows: torch.Tensor, seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path for a bf16 cache: the matmuls run in bf16 (fp32 accumulation; G and G_s come out rounded to bf16,
    relative error ≤ 2⁻⁹ per element, the same order as storing X and dY in bf16), the epilogue in fp32.
    On CPUs with AMX or AVX512-BF16 this is ~4× the fp32 matmul rate."""
    _check_importance_call(metric, weight, x, dy, rows, seq_len)
    if x.dtype != torch.bfloat16 or dy.dtype != torch.bfloat16:
        raise ValueError("the bf16 CPU path takes bf16 x and dy")
    w = weight.float()
    x_rows, dy_rows = x.index_select(0, rows), dy.index_select(0, rows)  # row copies: ~4x faster than x[rows]
    if not _with_fisher(metric):
        element = (dy_rows.t() @ x_rows).float().mul_(w).abs_()  # in place: one fp32 out × in buffer
    else:  # one sample at a time: G_s stays cache-sized instead of an n × out × in intermediate
        n = rows.numel() // seq_len
        dy_s, x_s = dy_rows.view(n, seq_len, -1), x_rows.view(n, seq_len, -1)
        grad, fisher = torch.zeros_like(w), torch.zeros_like(w)
        for s in range(n):
            g = (dy_s[s].t() @ x_s[s]).float()
            grad.add_(g)
            fisher.addcmul_(g, g)
        element = (w * grad).sub_(0.5 / n * w.square() * fisher).abs_()
    return element.sum(1), element.sum(0)


def cached_grad_importance(
    metric: str,
    weight: torch.Tensor,
    x: torch.Tensor,
    dy: torch.Tensor,
    rows: torch.Tensor,
    seq_len: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row scores, column scores) of `metric` for the token rows `rows` (`mix` needs `seq_len`).

    `auto`: Triton on CUDA; a bf16 cache on a CPU with native bf16 matmuls takes the bf16 CPU path; else the reference.
    """
    if use_triton(weight, backend):
        return cached_grad_importance_triton(metric, weight, x, dy, rows, seq_len)
    if backend == "auto" and x.dtype == dy.dtype == torch.bfloat16 and not x.is_cuda and native_bf16(x.device):
        return cached_grad_importance_bf16_cpu(metric, weight, x, dy, rows, seq_len)
    return cached_grad_importance_torch(metric, weight, x, dy, rows, seq_len)


def cached_grad_importance_triton(
    metric: str,
    weight: torch.Tensor,
    x: torch.Tensor,
    dy: torch.Tensor,
    rows: torch.Tensor,
    seq_len: int | None = None,
    **launch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused path: tiles of G (and F) accumulate in registers over the chosen token rows, then reduce into the outputs
    (`launch`: see `_tiles`)."""
    from adapruner.kernels._cached_gradient_kernels import cached_grad_importance_kernel

    _check_importance_call(metric, weight, x, dy, rows, seq_len)
    (block_m, block_n, block_t), launch = _tiles(x, launch)
    out_features, in_features = weight.shape
    row_scores = torch.zeros(out_features, dtype=torch.float32, device=weight.device)
    col_scores = torch.zeros(in_features, dtype=torch.float32, device=weight.device)
    mix = _with_fisher(metric)
    grid = (-(-out_features // block_m), -(-in_features // block_n))
    cached_grad_importance_kernel[grid](
        weight,
        x,
        dy,
        rows,
        row_scores,
        col_scores,
        out_features,
        in_features,
        rows.numel(),
        seq_len if mix else rows.numel(),
        weight.stride(0),
        weight.stride(1),
        x.stride(0),
        x.stride(1),
        dy.stride(0),
        dy.stride(1),
        MIX=mix,
        UPCAST=_interpreter_upcast(x),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_T=block_t,
        **launch,
    )
    return row_scores, col_scores


def sample_fisher_stats_torch(
    weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: per sample s, G_s = dY_sᵀ X_s; returns (n × out row stats, n × in column stats) of W² G_s²."""
    _check(weight, x, dy)
    n = _n_samples(x.shape[0], seq_len)
    w2 = weight.float().square()
    rows, cols = [], []
    for s in range(n):
        block = slice(s * seq_len, (s + 1) * seq_len)
        element = w2 * (dy[block].float().t() @ x[block].float()).square()
        rows.append(element.sum(1))
        cols.append(element.sum(0))
    return torch.stack(rows), torch.stack(cols)


def sample_fisher_stats(
    weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, seq_len: int, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Fisher statistics (rows, cols); Triton on CUDA tensors."""
    if use_triton(weight, backend):
        return sample_fisher_stats_triton(weight, x, dy, seq_len)
    return sample_fisher_stats_torch(weight, x, dy, seq_len)


def sample_fisher_stats_triton(
    weight: torch.Tensor,
    x: torch.Tensor,
    dy: torch.Tensor,
    seq_len: int,
    **launch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused path: one program per (sample, row tile, column tile); per-sample G_s tiles stay in registers."""
    from adapruner.kernels._cached_gradient_kernels import sample_fisher_kernel

    _check(weight, x, dy)
    (block_m, block_n, block_t), launch = _tiles(x, launch)
    n = _n_samples(x.shape[0], seq_len)
    out_features, in_features = weight.shape
    rows = torch.zeros(n, out_features, dtype=torch.float32, device=weight.device)
    cols = torch.zeros(n, in_features, dtype=torch.float32, device=weight.device)
    grid = (n, -(-out_features // block_m), -(-in_features // block_n))
    sample_fisher_kernel[grid](
        weight,
        x,
        dy,
        rows,
        cols,
        out_features,
        in_features,
        seq_len,
        weight.stride(0),
        weight.stride(1),
        x.stride(0),
        x.stride(1),
        dy.stride(0),
        dy.stride(1),
        UPCAST=_interpreter_upcast(x),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_T=block_t,
        **launch,
    )
    return rows, cols


def _tiles(x: torch.Tensor, given: dict[str, int]) -> tuple[tuple[int, ...], dict]:
    """(BLOCK_M, BLOCK_N, BLOCK_T) and launch options, the `given` ones (block_m, block_n, block_t, num_warps,
    num_stages) kept: on a GPU with 2-byte inputs (tensor-core
    dots) 128×256 tiles over 64 token rows (Hopper and later: the best of `bench.kernels --sweep` on an H200, 147 KB of
    shared memory in 3 stages) or 128×128 (older cards), 8 warps; 64×64×32 for fp32 (exact fp32 dots)."""
    if x.is_cuda and x.element_size() == 2:
        wide = torch.cuda.get_device_capability(x.device)[0] >= 9
        default_blocks, warps, stages = (128, 256 if wide else 128, 64), 8, 3
    else:
        default_blocks, warps, stages = (64, 64, 32), 4, 2
    unknown = set(given) - {"block_m", "block_n", "block_t", "num_warps", "num_stages"}
    if unknown:
        raise TypeError(
            f"unknown launch options {sorted(unknown)}: use block_m, block_n, block_t, num_warps, num_stages"
        )
    chosen = tuple(
        given.get(name) or default for name, default in zip(("block_m", "block_n", "block_t"), default_blocks)
    )
    return chosen, {"num_warps": given.get("num_warps") or warps, "num_stages": given.get("num_stages") or stages}


def subset_taylor2(stats: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """taylor2 channel scores of a sample subset from per-sample Fisher stats: ½ Σ_{s∈S} f_s / |S|."""
    if samples.numel() == 0:
        raise ValueError("the subset is empty: choose at least one sample")
    return 0.5 * stats[samples].sum(0) / samples.numel()


def _interpreter_upcast(x: torch.Tensor) -> bool:
    """bf16 tiles go to fp32 before the dot under TRITON_INTERPRET (its numpy dot mis-reads bf16); on GPUs never."""
    return x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _n_samples(n_tokens: int, seq_len: int) -> int:
    if seq_len < 1 or n_tokens % seq_len:
        raise ValueError(f"{n_tokens} token rows are not whole samples of seq_len {seq_len}")
    return n_tokens // seq_len


def _check_importance_call(
    metric: str, weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, rows: torch.Tensor, seq_len: int | None
) -> None:
    """The contract every cached-gradient importance path checks before it computes."""
    _check_metric(metric, rows, seq_len)
    _check(weight, x, dy)
    _check_rows(rows, x.shape[0])


def _check_metric(metric: str, rows: torch.Tensor, seq_len: int | None) -> None:
    if metric not in ACTIVATION_METRICS:
        raise ValueError(f"cached-gradient importance computes {', '.join(sorted(ACTIVATION_METRICS))}, not {metric!r}")
    if _with_fisher(metric) and (seq_len is None or seq_len < 1 or rows.numel() % seq_len):
        raise ValueError(f"metric {metric!r} needs seq_len, with rows holding whole samples of seq_len token rows each")
