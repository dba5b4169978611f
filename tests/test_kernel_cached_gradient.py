"""Fused cached-gradient kernels vs the torch reference (TRITON_INTERPRET=1 on CPU).

Tolerances: fp32 inputs rtol 1e-4 (ieee dot, different summation order); bf16/fp16 inputs rtol 2e-2 (the
reference upcasts before the matmul, the kernel's tensor-core dot multiplies in the input precision and
accumulates in fp32).
"""

import pytest
import torch

from adapruner.kernels.cached_gradient import (
    cached_grad_importance,
    cached_grad_importance_bf16_cpu,
    cached_grad_importance_torch,
    cached_grad_importance_triton,
    sample_fisher_stats_torch,
    sample_fisher_stats_triton,
    subset_taylor2,
)

RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
SEQ = 9  # tokens per sample, odd on purpose
OUT, IN = 40, 23  # neither a multiple of the 32-wide test blocks


def cache(dtype, n_samples=5, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=gen).to(device, dtype)
    x = torch.randn(n_samples * SEQ, IN, generator=gen).to(device, dtype)
    dy = torch.randn(n_samples * SEQ, OUT, generator=gen).to(device, dtype)
    return w, x, dy


def token_rows(samples, device="cpu"):
    return (torch.tensor(samples)[:, None] * SEQ + torch.arange(SEQ)).reshape(-1).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["taylor1", "mix"])
@pytest.mark.parametrize("samples", [[2], [0, 3, 4], [4, 1]])
def test_fused_importance_matches_reference(metric, dtype, samples, device):
    w, x, dy = cache(dtype, device=device)
    rows = token_rows(samples, device)
    expected = cached_grad_importance_torch(metric, w, x, dy, rows, SEQ)
    got = cached_grad_importance_triton(metric, w, x, dy, rows, SEQ, block_m=32, block_n=32, block_t=16)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=RTOL[dtype], atol=RTOL[dtype] * e.abs().max().item())


@pytest.mark.parametrize("metric", ["taylor1", "mix"])
@pytest.mark.parametrize("samples", [[2], [0, 3, 4]])
def test_bf16_cpu_path_matches_reference(metric, samples):
    """bf16 matmuls round G (and each G_s) once, by ≤ 2⁻⁹ relative, so a score moves by at most
    2⁻⁸ Σ (|W|·Σ_s|G_s| + W²·mean_s G_s²) over its elements (2⁻⁸: the rounding and its square in F, with margin)."""
    w, x, dy = cache(torch.bfloat16)
    rows = token_rows(samples)
    expected = cached_grad_importance_torch(metric, w, x, dy, rows, SEQ)
    got = cached_grad_importance_bf16_cpu(metric, w, x, dy, rows, SEQ)
    per_sample = torch.stack([dy[token_rows([s])].float().t() @ x[token_rows([s])].float() for s in samples])
    wf = w.float()
    magnitude = wf.abs() * per_sample.abs().sum(0) + wf.square() * per_sample.square().mean(0)
    for dim, (g, e) in enumerate(zip(got, expected)):
        assert ((g - e).abs() <= 2**-8 * magnitude.sum(1 - dim)).all()
    with pytest.raises(ValueError, match="takes bf16"):
        cached_grad_importance_bf16_cpu(metric, w, x.float(), dy.float(), rows, SEQ)


def test_fused_importance_equals_autograd_gradient():
    """G = dYᵀX is the weight gradient of a linear: check the reference against autograd once."""
    w, x, dy = cache(torch.float32)
    weight = w.clone().requires_grad_()
    (x @ weight.t()).backward(dy)
    rows = torch.arange(x.shape[0])
    row_scores, col_scores = cached_grad_importance_torch("taylor1", w, x, dy, rows)
    torch.testing.assert_close(row_scores, (w * weight.grad).abs().sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(col_scores, (w * weight.grad).abs().sum(0), rtol=1e-5, atol=1e-4)


def test_mix_uses_the_subset_fisher():
    """mix = Σ |W G − ½ W² F| with G = Σ_S G_s and F = mean_S G_s² from per-sample gradients (brute force)."""
    w, x, dy = cache(torch.float32)
    subset = [0, 2, 3]
    per_sample = torch.stack([dy[s * SEQ : (s + 1) * SEQ].t() @ x[s * SEQ : (s + 1) * SEQ] for s in subset])
    element = (w * per_sample.sum(0) - 0.5 * w.square() * per_sample.square().mean(0)).abs()
    got = cached_grad_importance_torch("mix", w, x, dy, token_rows(subset), SEQ)
    torch.testing.assert_close(got[0], element.sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], element.sum(0), rtol=1e-5, atol=1e-4)


def test_strided_cache_views(device):
    w, x, dy = cache(torch.float32, device=device)
    x_view = torch.cat([x, x], 1)[:, ::2]  # column stride 2
    rows = token_rows([1, 2], device)
    expected = cached_grad_importance_torch("taylor1", w, x_view, dy, rows)
    got = cached_grad_importance_triton(
        "taylor1", w.t().contiguous().t(), x_view, dy, rows, block_m=32, block_n=32, block_t=16
    )
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sample_fisher_stats_match_reference(dtype, device):
    w, x, dy = cache(dtype, device=device)
    expected = sample_fisher_stats_torch(w, x, dy, SEQ)
    got = sample_fisher_stats_triton(w, x, dy, SEQ, block_m=32, block_n=32, block_t=16)
    for g, e in zip(got, expected):
        assert g.shape == e.shape == (5, e.shape[1])
        torch.testing.assert_close(g, e, rtol=2 * RTOL[dtype], atol=2 * RTOL[dtype] * e.abs().max().item())


def test_subset_taylor2_equals_fisher_definition():
    """½ Σ_{s∈S} f_s / |S| = Σ_i ½ W² F with F = mean_{s∈S} G_s² (per-sample gradients, brute force)."""
    w, x, dy = cache(torch.float32)
    row_stats, col_stats = sample_fisher_stats_torch(w, x, dy, SEQ)
    subset = torch.tensor([0, 2, 3])
    per_sample = torch.stack([dy[s * SEQ : (s + 1) * SEQ].t() @ x[s * SEQ : (s + 1) * SEQ] for s in subset.tolist()])
    fisher = per_sample.square().mean(0)
    torch.testing.assert_close(subset_taylor2(row_stats, subset), (0.5 * w.square() * fisher).sum(1))
    torch.testing.assert_close(subset_taylor2(col_stats, subset), (0.5 * w.square() * fisher).sum(0))


def test_contract_errors():
    w, x, dy = cache(torch.float32)
    with pytest.raises(ValueError, match="subset is empty"):
        cached_grad_importance("taylor1", w, x, dy, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="subset is empty"):
        subset_taylor2(torch.zeros(3, 4), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="needs seq_len"):
        cached_grad_importance_triton("mix", w, x, dy, token_rows([0]))
    with pytest.raises(ValueError, match="whole samples"):
        cached_grad_importance("mix", w, x, dy, token_rows([0])[:-1], SEQ)
    with pytest.raises(ValueError, match=r"must lie in \[0, 45\)"):
        cached_grad_importance("taylor1", w, x, dy, torch.tensor([45]))
    with pytest.raises(ValueError, match="not whole samples"):
        sample_fisher_stats_torch(w, x, dy, 7)
