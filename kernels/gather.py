"""Compact kept rows and columns of many tensors in one launch: out_t = src_t[rows_t][:, cols_t].

A layer's pruning is one call: q/k/v rows, o columns and their biases (or gate/up rows, down columns and
biases). `None` keeps a dimension whole; 1-D tensors (biases) take `rows` only. The copy is dtype-agnostic:
the kernel moves 2- or 4-byte words, so bf16/fp16/fp32 all travel as raw bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapruner.kernels.dispatch import Backend, use_triton

GatherSpec = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
BITS_AS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check(specs: Sequence[GatherSpec]) -> None:
    """Shapes, and every index inside its dimension (one host read for all the index tensors' bounds)."""
    bounded: list[tuple[torch.Tensor, int]] = []
    for src, rows, cols in specs:
        if src.dim() not in (1, 2) or (src.dim() == 1 and cols is not None):
            raise ValueError("gather takes 2-D tensors, or 1-D tensors (biases) with rows only")
        bounded += [
            (index, size)
            for index, size in ((rows, src.shape[0]), (cols, src.shape[-1]))
            if index is not None and index.numel()
        ]
    if not bounded:
        return
    device = bounded[0][0].device
    extremes = torch.stack(
        [torch.stack([index.min(), index.max()]).to(device) for index, _ in bounded]
    ).tolist()  # one host read
    for (low, high), (_, size) in zip(extremes, bounded):
        if low < 0 or high >= size:
            raise ValueError(f"gather index out of range [0, {size})")


def gather_torch(specs: Sequence[GatherSpec]) -> list[torch.Tensor]:
    """Reference: index_select per tensor and dimension; results are contiguous."""
    _check(specs)
    out = []
    for src, rows, cols in specs:
        result = src if rows is None else src.index_select(0, rows)
        result = result if cols is None else result.index_select(1, cols)
        out.append(result.contiguous())
    return out


def gather(specs: Sequence[GatherSpec], backend: Backend = "auto") -> list[torch.Tensor]:
    """Gathered copies of every tensor in `specs`; one Triton launch on CUDA tensors."""
    if specs and use_triton(specs[0][0], backend):
        return gather_triton(specs)
    return gather_torch(specs)


def gather_triton(
    specs: Sequence[GatherSpec], block_r: int = 16, block_c: int = 256, num_warps: int = 4
) -> list[torch.Tensor]:
    """Fused path: grid (row tiles, column tiles, tensors); each program copies one tile of one tensor.
    Tensors whose columns stay whole are read along contiguous columns (vector loads)."""
    from adapruner.kernels._gather_kernel import gather_kernel

    _check(specs)
    sources, outputs, row_ids, col_ids, whole_cols, n_rows, n_cols, s_rows, s_cols = [], [], [], [], [], [], [], [], []
    for src, rows, cols in specs:
        matrix = src if src.dim() == 2 else src[:, None]
        device = src.device
        r = rows if rows is not None else torch.arange(matrix.shape[0], device=device)
        c = cols if cols is not None else r  # whole columns: the kernel never reads this stand-in
        n_c = cols.numel() if cols is not None else matrix.shape[1]
        out = torch.empty((r.numel(), n_c), dtype=src.dtype, device=device)
        words = BITS_AS[src.element_size()]
        sources.append(matrix.view(words))
        outputs.append(out)
        row_ids.append(r.to(torch.int64))
        col_ids.append(c.to(torch.int64))
        whole_cols.append(int(cols is None))
        n_rows.append(r.numel())
        n_cols.append(n_c)
        s_rows.append(matrix.stride(0))
        s_cols.append(matrix.stride(1))
    grid = (-(-max(n_rows) // block_r), -(-max(n_cols) // block_c), len(specs))
    gather_kernel[grid](
        tuple(sources),
        tuple(o.view(BITS_AS[o.element_size()]) for o in outputs),
        tuple(row_ids),
        tuple(col_ids),
        tuple(whole_cols),
        tuple(n_rows),
        tuple(n_cols),
        tuple(s_rows),
        tuple(s_cols),
        N_TENSORS=len(specs),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return [out if src.dim() == 2 else out[:, 0] for out, (src, _, _) in zip(outputs, specs)]
