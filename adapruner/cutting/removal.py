"""Remove the units a plan drops, physically: one fused gather per layer, modules resized in place."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import ExitStack

import torch
from torch import nn

from adapruner.choosing.allocation import prices
from adapruner.choosing.plan import PrunePlan
from adapruner.cutting.compensation import Update, install
from adapruner.kernels.dispatch import Backend
from adapruner.kernels.gather import gather
from adapruner.model.big_model import place_like, weights
from adapruner.model.structure import expert_cuts, layer_cuts, layer_info, linear_of, resize_modules


def apply_plan(model: nn.Module, plan: PrunePlan, backend: Backend = "auto") -> None:
    """Remove every unit the plan does not keep, in place: one fused gather per layer (weights and biases).

    Keeps the module attributes the forwards read (GQA ratio, MLP width) consistent (`structure.resize_modules`).
    """
    for index in sorted(set(plan.attention) | set(plan.mlp)):
        info = layer_info(model, index)
        cuts = layer_cuts(info, plan.attention.get(index), plan.mlp.get(index))
        for experts, name, dim, kept in expert_cuts(info, plan.mlp.get(index)):
            weight = getattr(experts, name).detach()
            index_shape = list(weight.shape)
            index_shape[dim] = kept.shape[1]
            view = kept.to(weight.device).unsqueeze(2 if dim == 1 else 1).expand(index_shape)
            setattr(experts, name, nn.Parameter(torch.gather(weight, dim, view), requires_grad=True))
        if cuts:
            _cut(cuts, backend)
        resize_modules(layer_info(model, index))


def cut(model: nn.Module, plan: PrunePlan, updates: Mapping[str, Update] | None = None) -> None:
    """Prune `model` in place by `plan`, then install the refit output linears `updates` (`compensation.refit_updates`)
    — the one cut every path ends with."""
    apply_plan(model, plan)
    install(model, updates or {})


def _cut(cuts: list, backend: Backend) -> None:
    """Replace every cut module with one holding its kept rows and columns: one fused gather for all of them."""
    specs = []
    with ExitStack() as loaded:  # offloaded weights are read on their execution device, one layer at a time
        for owner, name, rows, cols in cuts:
            module = loaded.enter_context(weights(getattr(owner, name)))
            device = module.weight.device
            rows, cols = (None if t is None else t.to(device) for t in (rows, cols))
            specs.append((module.weight.detach(), rows, cols))
            if getattr(module, "bias", None) is not None:
                specs.append((module.bias.detach(), rows, None))
        gathered = iter(gather(specs, backend))
    for owner, name, _rows, _cols in cuts:
        old = getattr(owner, name)
        weight = next(gathered)
        bias = next(gathered) if getattr(old, "bias", None) is not None else None
        setattr(owner, name, place_like(_module_from(old, weight, bias), old))


def _module_from(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A linear like `old` owning the gathered `weight` and `bias`; for a norm (1-D weight), a copy of it with
    `weight`."""
    if isinstance(old, nn.Linear):
        return linear_of(weight, bias)
    norm = copy.copy(old)
    norm._parameters = dict(old._parameters)
    norm.weight = nn.Parameter(weight, requires_grad=True)
    return norm


def plan_removed(model: nn.Module, plan: PrunePlan) -> int:
    """Parameters the plan removes from the (unpruned) `model`: every dropped head's and channel's rows and columns."""
    removed = 0
    for index in sorted(set(plan.attention) | set(plan.mlp)):
        info = layer_info(model, index)
        kv_unit, channel = prices(info, "kv")
        q_head = prices(info, "query")[0] // info.n_kv_heads
        if index in plan.attention:
            keep_q, keep_kv = plan.attention[index]
            dropped_kv = info.n_kv_heads - len(keep_kv)
            removed += dropped_kv * kv_unit + (info.n_heads - len(keep_q) - dropped_kv * info.heads_per_kv) * q_head
        if index in plan.mlp:  # a MoE layer: every expert loses (units − kept) / experts channels
            removed += (info.mlp_units - len(plan.mlp[index])) * channel // max(1, info.n_experts)
    return removed
