"""pytest-benchmark suite: `pytest bench/test_bench_kernels.py --benchmark-only`.

Small LLaMA-like shapes so it runs anywhere; on a CUDA device the Triton providers are benchmarked too.
"""

import pytest
import torch

from adapruner.kernels.cached_gradient import cached_grad_importance_torch, cached_grad_importance_triton
from adapruner.kernels.channel_importance import channel_importance_torch, channel_importance_triton
from adapruner.kernels.gather import gather_torch, gather_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ["torch", "triton"] if DEVICE == "cuda" else ["torch"]
SHAPE = (1024, 512)


def _run(benchmark, fn):
    def synced():
        result = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return result

    return benchmark(synced)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_importance(benchmark, provider):
    w, g = (torch.randn(SHAPE, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    fn = channel_importance_torch if provider == "torch" else channel_importance_triton
    scores = _run(benchmark, lambda: fn("taylor1", w, 0, g))
    torch.testing.assert_close(scores, channel_importance_torch("taylor1", w, 0, g), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_gather(benchmark, provider):
    w = torch.randn(SHAPE, device=DEVICE, dtype=torch.bfloat16)
    keep = torch.arange(0, SHAPE[0], 2, device=DEVICE)
    fn = gather_torch if provider == "torch" else gather_triton
    (out,) = _run(benchmark, lambda: fn([(w, keep, None)]))
    assert torch.equal(out, w[keep])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cached_grad_importance(benchmark, provider):
    w = torch.randn(SHAPE, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(256, SHAPE[1], device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(256, SHAPE[0], device=DEVICE, dtype=torch.bfloat16)
    rows = torch.arange(256, device=DEVICE)
    fn = cached_grad_importance_torch if provider == "torch" else cached_grad_importance_triton
    row_scores, col_scores = _run(benchmark, lambda: fn("taylor1", w, x, dy, rows))
    expected = (w.float() * (dy.float().t() @ x.float())).abs()  # |W ⊙ G| with G = dYᵀX materialised
    torch.testing.assert_close(row_scores, expected.sum(1), rtol=2e-2, atol=2e-2 * expected.sum(1).abs().max().item())
    torch.testing.assert_close(col_scores, expected.sum(0), rtol=2e-2, atol=2e-2 * expected.sum(0).abs().max().item())
