"""The Triton kernel behind `gather_triton` (imported lazily: triton is an optional dependency)."""

import triton
import triton.language as tl


@triton.jit
def gather_kernel(
    srcs,
    dsts,
    row_ids,
    col_ids,
    whole_cols,
    n_rows,
    n_cols,
    s_rows,
    s_cols,
    N_TENSORS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Tensor t = program_id(2): dst_t[r, c] = src_t[row_ids_t[r], col_ids_t[c]] for one (BLOCK_R × BLOCK_C) tile.
    Where whole_cols_t is set, columns are read in place (c itself): contiguous, so the copy vectorises."""
    tensor = tl.program_id(2)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    for t in tl.static_range(N_TENSORS):
        if tensor == t:
            r_mask = r < n_rows[t]
            c_mask = c < n_cols[t]
            mask = r_mask[:, None] & c_mask[None, :]
            src_r = tl.load(row_ids[t] + r, mask=r_mask, other=0)
            row_start = srcs[t] + src_r[:, None] * s_rows[t]
            if whole_cols[t]:
                values = tl.load(row_start + c[None, :] * s_cols[t], mask=mask)
            else:
                src_c = tl.load(col_ids[t] + c, mask=c_mask, other=0)
                values = tl.load(row_start + src_c[None, :] * s_cols[t], mask=mask)
            tl.store(dsts[t] + r[:, None] * n_cols[t] + c[None, :], values, mask=mask)
