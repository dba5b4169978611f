"""KL divergence of a pruned model's next-token distributions from the dense model's, on the dense top k.

For each token position t the dense distribution p is kept as its k most likely tokens K_t (log-probabilities) and
the mass of the rest, p_tail = 1 − Σ_{i∈K_t} p_i; the pruned model's q is read at K_t and its tail q_tail likewise:
    KL_t = Σ_{i∈K_t} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)
the exact KL between the two distributions with the tokens outside K_t merged into one outcome (a lower bound of the
full KL, equal to it as k → vocab; 0 for the dense model itself). The score is the mean of KL_t over all positions.
Storage: k (fp32 value, int64 index) pairs and one tail per position, instead of the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapruner.data.calibration import window_batches
from adapruner.devices import model_device

DEFAULT_TOP_K = 64


@dataclass
class DenseTopK:
    """The dense model's top-k log-probabilities (n × T × k), their token ids, and log p_tail (n × T)."""

    log_probs: torch.Tensor
    tokens: torch.Tensor
    log_tail: torch.Tensor


def _log_tail(top: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(top)) over the last dimension, kept finite where the top holds all the mass."""
    return torch.log1p(-top.exp().sum(-1).clamp_max(1 - 1e-7))


def _forward(model: nn.Module, batch: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
    """fp32 log-probabilities of one batch (the model reads `embeds` where given, else the token ids)."""
    inputs = {"input_ids": batch} if embeds is None else {"inputs_embeds": embeds}
    return torch.log_softmax(model(**inputs, use_cache=False).logits.float(), dim=-1)


@torch.no_grad()
def dense_top_k(
    model: nn.Module,
    windows: torch.Tensor,
    k: int = DEFAULT_TOP_K,
    batch_size: int = 8,
    inputs_embeds: torch.Tensor | None = None,
) -> DenseTopK:
    """The `DenseTopK` of `model` on every position of `windows` (`inputs_embeds`: what it reads instead of ids)."""
    values, tokens = [], []
    for start, batch in window_batches(windows, batch_size, model_device(model)):
        embeds = None if inputs_embeds is None else inputs_embeds[start : start + batch_size].to(batch.device)
        top = _forward(model, batch, embeds).topk(k, dim=-1)
        values.append(top.values)
        tokens.append(top.indices)
    log_probs = torch.cat(values)
    return DenseTopK(log_probs, torch.cat(tokens), _log_tail(log_probs))


@torch.no_grad()
def mean_kl(
    model: nn.Module,
    windows: torch.Tensor,
    dense: DenseTopK,
    batch_size: int = 8,
    inputs_embeds: torch.Tensor | None = None,
) -> float:
    """Mean over all positions of `windows` of KL_t (module docstring) from the dense model's `dense` to `model`."""
    return float(window_divergences(model, windows, dense, batch_size, inputs_embeds)[0].mean())


@torch.no_grad()
def window_divergences(
    model: nn.Module,
    windows: torch.Tensor,
    dense: DenseTopK,
    batch_size: int = 8,
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window, from one forward: the mean of KL_t over its positions and its mean next-token negative
    log-likelihood −(1/(T−1)) Σ_t log q(x_{t+1} | x_≤t) (the log-perplexity of the window); fp64, on the CPU."""
    kls, nlls = [], []
    for start, batch in window_batches(windows, batch_size, model_device(model)):
        rows = slice(start, start + batch_size)
        embeds = None if inputs_embeds is None else inputs_embeds[rows].to(batch.device)
        log_q = _forward(model, batch, embeds)
        log_p, tokens = dense.log_probs[rows].to(log_q.device), dense.tokens[rows].to(log_q.device)
        log_q_top = log_q.gather(-1, tokens)
        log_p_tail, log_q_tail = dense.log_tail[rows].to(log_q.device), _log_tail(log_q_top)
        kl = (log_p.exp() * (log_p - log_q_top)).sum(-1) + log_p_tail.exp() * (log_p_tail - log_q_tail)
        kls.append(kl.double().mean(-1).cpu())
        nlls.append(-log_q[:, :-1].gather(-1, batch[:, 1:, None]).squeeze(-1).double().mean(-1).cpu())
    return torch.cat(kls), torch.cat(nlls)
