"""Perplexity over non-overlapping windows of held-out text: exp(mean next-token cross-entropy over all tokens)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
    report: Callable[[int, float], None] | None = None,
) -> float:
    """exp(Σ token NLL / Σ tokens) over the rows of `windows` (n × seq_len), each row scored on its own.

    `report(batch index, running perplexity)` is called after every batch (it may raise to stop early).
    """
    if windows.shape[0] == 0:
        raise ValueError("no evaluation window: the text is shorter than one --seq-len window")
    total_nll, total_tokens = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for step, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress)):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
        if report is not None:
            report(step, math.exp(total_nll / total_tokens))
    return math.exp(total_nll / total_tokens)
