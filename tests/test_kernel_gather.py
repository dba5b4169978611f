"""Fused multi-tensor gather vs index_select (TRITON_INTERPRET=1 on CPU): exact copies for every dtype."""

import pytest
import torch

from adapruner.kernels.gather import gather, gather_torch, gather_triton


def layer_like(dtype, device):
    gen = torch.Generator().manual_seed(0)
    q, k, o = (torch.randn(shape, generator=gen).to(device, dtype) for shape in ((48, 37), (16, 37), (37, 48)))
    bias = torch.randn(48, generator=gen).to(device, dtype)
    keep_q, keep_kv = (torch.tensor(ids, device=device) for ids in ([0, 1, 2, 3, 8, 9, 10, 11, 40, 47], [3, 4, 5, 15]))
    strided = (o.t(), torch.tensor([47, 0, 20], device=device), torch.tensor([36, 0, 5], device=device))
    strided_whole_columns = (o.t(), keep_kv, None)  # columns read in place with a column stride of 37
    return [
        (q, keep_q, None),
        (k, keep_kv, None),
        (o, None, keep_q),
        (bias, keep_q, None),
        strided,
        strided_whole_columns,
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_matches_index_select_exactly(dtype, device):
    specs = layer_like(dtype, device)
    for got, expected in zip(gather_triton(specs, block_r=16, block_c=32), gather_torch(specs)):
        assert got.dtype == dtype and got.shape == expected.shape and got.is_contiguous()
        assert torch.equal(got, expected)


def test_gather_keeps_whole_dimensions_and_biases(device):
    w = torch.arange(12.0, device=device).view(3, 4)
    got = gather(
        [
            (w, None, torch.tensor([3, 1], device=device)),
            (torch.arange(5.0, device=device), torch.tensor([4], device=device), None),
        ],
        backend="triton",
    )
    assert got[0].tolist() == [[3.0, 1.0], [7.0, 5.0], [11.0, 9.0]]
    assert got[1].tolist() == [4.0]


def test_gather_rejects_bad_indices(device):
    with pytest.raises(ValueError, match="out of range"):
        gather_triton([(torch.zeros(3, 4, device=device), torch.tensor([3], device=device), None)])
    with pytest.raises(ValueError, match="rows only"):
        gather_torch([(torch.zeros(3), None, torch.tensor([0]))])
