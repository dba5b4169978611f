"""The Triton kernel behind `channel_importance_triton` (imported lazily: triton is an optional dependency)."""

import triton
import triton.language as tl


@triton.jit
def channel_importance_kernel(
    w_ptr,
    g_ptr,
    f_ptr,
    a_ptr,
    out_ptr,
    C,
    K,
    K_CHUNK,
    s_wc,
    s_wk,
    s_gc,
    s_gk,
    s_fc,
    s_fk,
    s_a,
    METRIC: tl.constexpr,
    ACT_ON_REDUCED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[c] += Σ_{k in chunk} e(W[c,k], G[c,k], F[c,k], a) for a channel block (program axis 0) and a chunk of
    K_CHUNK reduced indices (axis 1: split-K, partial sums meet by atomic add; out starts at zero).
    METRIC codes: 0 l1, 1 l2, 2 taylor1, 3 vector (signed W·G: the caller takes |·| of the total), 4 taylor2
    (½W²F), 5 mix (|W·G − ½W²F|), 6 act (|W|·a)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    k_start = tl.program_id(1) * K_CHUNK
    k_stop = tl.minimum(k_start + K_CHUNK, K)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = c_mask[:, None] & (k < k_stop)[None, :]
        w = tl.load(w_ptr + c[:, None] * s_wc + k[None, :] * s_wk, mask=mask, other=0.0).to(tl.float32)
        if METRIC == 0:
            e = tl.abs(w)
        elif METRIC == 1:
            e = w * w
        elif METRIC == 6:
            if ACT_ON_REDUCED:
                a = tl.load(a_ptr + k * s_a, mask=k < k_stop, other=0.0).to(tl.float32)[None, :]
            else:
                a = tl.load(a_ptr + c * s_a, mask=c_mask, other=0.0).to(tl.float32)[:, None]
            e = tl.abs(w) * a
        elif METRIC == 4:
            f = tl.load(f_ptr + c[:, None] * s_fc + k[None, :] * s_fk, mask=mask, other=0.0).to(tl.float32)
            e = 0.5 * w * w * f
        else:
            g = tl.load(g_ptr + c[:, None] * s_gc + k[None, :] * s_gk, mask=mask, other=0.0).to(tl.float32)
            if METRIC == 2:
                e = tl.abs(w * g)
            elif METRIC == 3:
                e = w * g
            else:
                f = tl.load(f_ptr + c[:, None] * s_fc + k[None, :] * s_fk, mask=mask, other=0.0).to(tl.float32)
                e = tl.abs(w * g - 0.5 * w * w * f)
        acc += tl.sum(e, axis=1)
    tl.atomic_add(out_ptr + c, acc, mask=c_mask)
