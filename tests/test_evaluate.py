"""Perplexity = exp(mean token NLL) over all windows, independent of batch size."""

import math

import pytest
import torch

from adapruner.evaluation.evaluate import perplexity


def test_perplexity_matches_hf_loss(mha_model, token_batch):
    with torch.no_grad():
        losses = [mha_model(input_ids=r[None], labels=r[None]).loss.item() for r in token_batch]
    expected = math.exp(sum(losses) / len(losses))  # equal window lengths: mean of means = token mean
    assert perplexity(mha_model, token_batch, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    assert perplexity(mha_model, token_batch, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-5)


def test_chunked_nll_equals_one_cross_entropy():
    from adapruner.evaluation.evaluate import CE_ROWS, nll_sum

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2 * CE_ROWS + 7, 97, generator=gen)  # per window two whole chunks and a ragged one
    targets = torch.randint(0, 97, logits.shape[:2], generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        chosen = logits.to(dtype)
        expected = torch.nn.functional.cross_entropy(
            chosen.double().reshape(-1, 97), targets.reshape(-1), reduction="sum"
        ).item()
        assert nll_sum(chosen, targets) == pytest.approx(expected, rel=1e-6)
