"""Calibration statistics of the prunable linears from a forward+backward over the samples.

For samples s with per-sample loss L_s (mean next-token cross-entropy over the window):
    grad    G = Σ_s ∂L_s/∂W                (the gradient of the loss summed over samples)
    fisher  F = (1/n) Σ_s (∂L_s/∂W)²       (empirical Fisher diagonal, from per-sample gradients)
    act     a_i = sqrt(Σ_tokens x_i²)       (input-feature norm over all calibration tokens)
F needs per-sample gradients: one backward per sample. G and a need only sums over samples, so without F the
samples go through in batches of `batch_size` (the summed loss's gradient is G exactly).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapruner.importance import LinearStats


def sample_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy, shape (batch,)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return token_loss.view(targets.shape).mean(1)


def collect_stats(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    input_ids: torch.Tensor,
    need: frozenset[str],
    progress: bool = True,
    batch_size: int = 8,
) -> dict[str, LinearStats]:
    """`LinearStats` for every linear in `linears`, holding only what `need` names (grad, fisher, act_norm)."""
    stats = {name: LinearStats() for name in linears}
    if not need:
        return stats
    need_grad = bool(need & {"grad", "fisher"})
    step = 1 if "fisher" in need else batch_size
    act_sq = {name: torch.zeros(lin.in_features) for name, lin in linears.items()} if "act_norm" in need else {}
    with only_these_require_grad(model, linears.values() if need_grad else ()), _input_square_sums(linears, act_sq):
        for start in tqdm(range(0, input_ids.shape[0], step), desc="calibration", unit="batch", disable=not progress):
            batch = input_ids[start : start + step]
            if not need_grad:
                with torch.no_grad():
                    model(input_ids=batch)
                continue
            sample_loss(model, batch).sum().backward()
            for name, linear in linears.items():
                grad = linear.weight.grad.float()  # one sample's gradient when F is needed, else a batch's sum
                linear.weight.grad = None
                entry = stats[name]
                entry.grad = grad.clone() if entry.grad is None else entry.grad.add_(grad)
                if "fisher" in need:
                    square = grad.square()
                    entry.fisher = square if entry.fisher is None else entry.fisher.add_(square)
    n = input_ids.shape[0]
    for name, entry in stats.items():
        if entry.fisher is not None:
            entry.fisher.div_(n)
        if "grad" not in need:
            entry.grad = None
        if name in act_sq:
            entry.act_norm = act_sq[name].sqrt()
    return stats


@contextmanager
def only_these_require_grad(model: nn.Module, linears):
    """Turn off gradients of every parameter but the given linears' weights; restore on exit."""
    before = {p: p.requires_grad for p in model.parameters()}
    targets = {id(lin.weight) for lin in linears}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in targets)
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
            p.grad = None


@contextmanager
def _input_square_sums(linears: dict[str, nn.Linear], sums: dict[str, torch.Tensor]):
    """While active, add Σ_tokens x_i² of each listed linear's input into `sums[name]`."""
    handles = []
    for name in sums:
        def hook(_module, inputs, _output, name=name):
            x = inputs[0].detach().float()
            sums[name].add_(x.reshape(-1, x.shape[-1]).square().sum(0))
        handles.append(linears[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
