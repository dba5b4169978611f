"""Triton kernels behind `cached_gradient` (imported lazily: triton is an optional dependency)."""

import triton
import triton.language as tl


@triton.jit
def _grad_tile(
    x_ptr,
    dy_ptr,
    rows_ptr,
    t_start,
    t_stop,
    m,
    n,
    M,
    N,
    s_xt,
    s_xc,
    s_dt,
    s_dc,
    GATHER: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """fp32 tile G[m, n] = Σ_t dY[t, m] X[t, n] over token positions t_start … t_stop-1 (through rows_ptr if GATHER).
    UPCAST multiplies in fp32 (needed for bf16 under TRITON_INTERPRET, whose numpy dot has no bf16)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(t_start, t_stop, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < t_stop
        if GATHER:
            t = tl.load(rows_ptr + t, mask=t_mask, other=0).to(tl.int64)
        dyt = tl.load(
            dy_ptr + m[:, None] * s_dc + t[None, :] * s_dt, mask=(m < M)[:, None] & t_mask[None, :], other=0.0
        )
        xt = tl.load(x_ptr + t[:, None] * s_xt + n[None, :] * s_xc, mask=t_mask[:, None] & (n < N)[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc += tl.dot(dyt, xt, input_precision="ieee") if dyt.dtype == tl.float32 else tl.dot(dyt, xt)
    return acc


@triton.jit
def cached_grad_importance_kernel(
    w_ptr,
    x_ptr,
    dy_ptr,
    rows_ptr,
    row_out,
    col_out,
    M,
    N,
    T,
    L,
    s_wm,
    s_wn,
    s_xt,
    s_xc,
    s_dt,
    s_dc,
    MIX: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Tile (m, n) over the T chosen token rows, in segments of L rows (one sample each for MIX):
    G = Σ_seg G_seg; F = mean_seg G_seg² (MIX); e = |W G| or |W G − ½ W² F|;
    row_out[m] += Σ_n e, col_out[n] += Σ_m e."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    grad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    fisher = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, T, L):
        part = _grad_tile(
            x_ptr,
            dy_ptr,
            rows_ptr,
            start,
            start + L,
            m,
            n,
            M,
            N,
            s_xt,
            s_xc,
            s_dt,
            s_dc,
            True,
            UPCAST,
            BLOCK_M,
            BLOCK_N,
            BLOCK_T,
        )
        grad += part
        if MIX:
            fisher += part * part
    mask = (m < M)[:, None] & (n < N)[None, :]
    w = tl.load(w_ptr + m[:, None] * s_wm + n[None, :] * s_wn, mask=mask, other=0.0).to(tl.float32)
    if MIX:
        e = tl.abs(w * grad - 0.5 * w * w * fisher / (T // L))
    else:
        e = tl.abs(w * grad)
    tl.atomic_add(row_out + m, tl.sum(e, axis=1), mask=m < M)
    tl.atomic_add(col_out + n, tl.sum(e, axis=0), mask=n < N)


@triton.jit
def sample_fisher_kernel(
    w_ptr,
    x_ptr,
    dy_ptr,
    row_out,
    col_out,
    M,
    N,
    L,
    s_wm,
    s_wn,
    s_xt,
    s_xc,
    s_dt,
    s_dc,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Sample s, tile (m, n): G_s = dY_sᵀ X_s over its L token rows; e = W² G_s²;
    row_out[s, m] += Σ_n e, col_out[s, n] += Σ_m e."""
    s = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    grad = _grad_tile(
        x_ptr,
        dy_ptr,
        dy_ptr,
        s * L,
        s * L + L,
        m,
        n,
        M,
        N,
        s_xt,
        s_xc,
        s_dt,
        s_dc,
        False,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_T,
    )
    w = tl.load(w_ptr + m[:, None] * s_wm + n[None, :] * s_wn, mask=(m < M)[:, None] & (n < N)[None, :], other=0.0).to(
        tl.float32
    )
    e = w * w * grad * grad
    tl.atomic_add(row_out + s * M + m, tl.sum(e, axis=1), mask=m < M)
    tl.atomic_add(col_out + s * N + n, tl.sum(e, axis=0), mask=n < N)
