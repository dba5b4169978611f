"""Triton channel importance vs the torch reference (TRITON_INTERPRET=1 on CPU): every metric, both
dimensions, odd sizes, strided inputs, fp32/bf16/fp16 inputs.

Tolerances: fp32 inputs rtol 1e-5; bf16/fp16 inputs are upcast to fp32 in both paths, so only the summation
order differs: rtol 1e-4. Absolute tolerance scales with the reduced length.
"""

import pytest
import torch

from adapruner.kernels.channel_importance import channel_importance, channel_importance_torch, channel_importance_triton
from adapruner.scoring.metrics import KERNEL_METRICS

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, g = (torch.randn(shape, generator=gen) for _ in range(2))
    f = torch.rand(shape, generator=gen)
    a = torch.rand(shape[1], generator=gen)
    return [t.to(device, dtype) for t in (w, g, f, a)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("metric", list(KERNEL_METRICS))
def test_kernel_matches_reference(metric, dim, dtype, device):
    w, g, f, a = inputs((37, 300), dtype, device)  # neither side a multiple of the blocks
    expected = channel_importance_torch(metric, w, dim, g, f, a)
    got = channel_importance_triton(metric, w, dim, g, f, a, block_c=16, block_k=128)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=RTOL[dtype], atol=1e-5 * w.shape[1 - dim])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("metric", ["vector", "taylor1", "act"])
def test_split_reduction_matches_reference(metric, dim, dtype, device):
    """Chunks of the reduced dimension summed by atomic add (the last chunk partial; vector's |·| after the total)."""
    w, g, f, a = inputs((37, 300), dtype, device, seed=2)
    expected = channel_importance_torch(metric, w, dim, g, f, a)
    for split in (2, 3):
        got = channel_importance_triton(metric, w, dim, g, f, a, block_c=16, block_k=64, split_k=split)
        torch.testing.assert_close(got, expected, rtol=RTOL[dtype], atol=1e-5 * w.shape[1 - dim])


@pytest.mark.parametrize("dim", [0, 1])
def test_default_launch_matches_reference(dim, device):
    """The launch the product takes (tiles chosen from the layout, split-K from the device) gives the reference."""
    w, g, f, a = inputs((37, 300), torch.bfloat16, device, seed=3)
    for metric in KERNEL_METRICS:
        expected = channel_importance_torch(metric, w, dim, g, f, a)
        torch.testing.assert_close(
            channel_importance_triton(metric, w, dim, g, f, a), expected, rtol=1e-4, atol=1e-5 * w.shape[1 - dim]
        )


@pytest.mark.parametrize("metric", ["taylor1", "mix", "act"])
def test_kernel_reads_strided_inputs(metric, device):
    w, g, f, a = inputs((64, 45), torch.float32, device, seed=1)
    wt, gt, ft = w.t(), g.t(), f.t()  # (45 × 64) views, not contiguous
    a_strided = torch.rand(128, device=device)[::2]
    for dim in (0, 1):
        expected = channel_importance_torch(metric, wt, dim, gt, ft, a_strided)
        got = channel_importance_triton(metric, wt, dim, gt, ft, a_strided, block_c=8, block_k=64)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_dispatch_forces_each_path(device):
    w, g, f, a = inputs((5, 7), torch.float32, device)
    by_triton = channel_importance("taylor1", w, 0, g, backend="triton")
    by_torch = channel_importance("taylor1", w, 0, g, backend="torch")
    torch.testing.assert_close(by_triton, by_torch)
    with pytest.raises(ValueError, match="unknown backend"):
        channel_importance("l1", w, 0, backend="cuda")


def test_kernel_rejects_what_the_reference_rejects(device):
    w, _, _, _ = inputs((5, 7), torch.float32, device)
    with pytest.raises(ValueError, match="needs fisher"):
        channel_importance_triton("taylor2", w, 0)
