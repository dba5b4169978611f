"""Perplexity over non-overlapping windows of held-out text: exp(mean next-token cross-entropy over all tokens)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adapruner.data.calibration import window_batches
from adapruner.devices import model_device

CE_ROWS = 128  # token rows per cross-entropy chunk: a chunk's fp32 logits stay in the CPU's caches (5x faster)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ −log softmax(logits)[target] in fp32 over (batch × tokens × vocab) logits, `CE_ROWS` tokens at a time
    (each chunk a contiguous slice of one window: no full-size copy); one host read per call."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for window, target in zip(logits, targets):
        for row in range(0, target.shape[0], CE_ROWS):
            total += F.cross_entropy(window[row : row + CE_ROWS].float(), target[row : row + CE_ROWS], reduction="sum")
    return total.item()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
    report: Callable[[int, float], None] | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> float:
    """exp(Σ token NLL / Σ tokens) over the rows of `windows` (n × seq_len), each row scored on its own.

    `report(batch index, running perplexity)` is called after every batch (it may raise to stop early).
    `inputs_embeds` (n × seq_len × hidden), when given, is what the model reads instead of embedding `windows`,
    which then only supply the targets. Windows move to the model's device batch by batch.
    """
    if windows.shape[0] == 0:
        raise ValueError("no evaluation window: the text is shorter than one --seq-len window")
    total_nll, total_tokens = 0.0, 0
    device = model_device(model)
    batches = window_batches(windows, batch_size, device, desc if progress else None)
    for step, (start, batch) in enumerate(batches):
        inputs = (
            {"input_ids": batch}
            if inputs_embeds is None
            else {"inputs_embeds": inputs_embeds[start : start + batch_size].to(device)}
        )
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        targets = batch[:, 1:]
        total_nll += nll_sum(logits, targets)
        total_tokens += targets.numel()
        if report is not None:
            report(step, math.exp(total_nll / total_tokens))
    return math.exp(total_nll / total_tokens)
