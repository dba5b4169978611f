"""Perplexity = exp(mean token NLL) over all windows, independent of batch size."""
import math

import pytest
import torch

from adapruner.evaluate import perplexity


def test_perplexity_matches_hf_loss(mha_model, token_batch):
    with torch.no_grad():
        losses = [mha_model(input_ids=r[None], labels=r[None]).loss.item() for r in token_batch]
    expected = math.exp(sum(losses) / len(losses))  # equal window lengths: mean of means = token mean
    assert perplexity(mha_model, token_batch, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    assert perplexity(mha_model, token_batch, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-5)

