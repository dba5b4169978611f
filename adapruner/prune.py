"""Choose the units to keep from importance scores, and remove the others physically.

Ratio semantics (LLM-Pruner's): `ratio` r removes round(r · n) units of each pruned group — kv groups (or query
heads inside every kv group) of attention, channels of the MLP — in every layer of the pruned range.
`--target-params p` is a parameter budget instead: see `adapruner.allocation` (`solve_ratio` remains the smallest
single ratio removing at least p, for callers that want LLM-Pruner's meaning of a target).
"""
from __future__ import annotations

import warnings
from contextlib import ExitStack
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from adapruner.allocation import (
    DEFAULT_MIN_KEEP, Counts, attention_units, count_params, budget_counts, check_allocation, depth_weights, empties_a_group, global_counts, prices,
    ratio_counts, removed_by,
    target_count,
)
from adapruner.big_model import place_like, weights
from adapruner.errors import AdaPrunerError
from adapruner.importance import Importance
from adapruner.kernels.gather import gather
from adapruner.kernels.dispatch import Backend
from adapruner.structure import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, AttnGranularity, LayerInfo, attention_group, layer_info, mlp_group


@dataclass
class PrunePlan:
    """Kept units per layer: attention as (kept query heads, kept kv heads), MLP as kept channels (sorted)."""

    attention: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)
    mlp: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: {"attention": {"4": [[kept q], [kept kv]]}, "mlp": {"4": [kept channels]}}."""
        return self._with_units_as(list)

    @classmethod
    def from_dict(cls, data: Mapping) -> "PrunePlan":
        return cls._with_units_from(data, list)

    def encode(self) -> dict:
        """Compact form for the study (one per trial): every kept list as the hex of its bit mask Σ 2^unit."""
        return self._with_units_as(_mask)

    @classmethod
    def decode(cls, data: Mapping) -> "PrunePlan":
        return cls._with_units_from(data, _units)

    def _with_units_as(self, form) -> dict:
        return {"attention": {str(i): [form(q), form(kv)] for i, (q, kv) in self.attention.items()}, "mlp": {str(i): form(kept) for i, kept in self.mlp.items()}}

    @classmethod
    def _with_units_from(cls, data: Mapping, read) -> "PrunePlan":
        return cls({int(i): (read(q), read(kv)) for i, (q, kv) in data["attention"].items()}, {int(i): read(kept) for i, kept in data["mlp"].items()})

    def units_differing(self, other: "PrunePlan") -> dict[str, int]:
        """Units this plan keeps and `other` removes, by kind (both plans keep as many of each)."""
        layers = sorted(set(self.attention) | set(self.mlp) | set(other.attention) | set(other.mlp))
        counts = {"query_heads": 0, "kv_heads": 0, "mlp_channels": 0}
        for i in layers:
            mine, theirs = self.attention.get(i, ([], [])), other.attention.get(i, ([], []))
            counts["query_heads"] += len(set(mine[0]) - set(theirs[0]))
            counts["kv_heads"] += len(set(mine[1]) - set(theirs[1]))
            counts["mlp_channels"] += len(set(self.mlp.get(i, [])) - set(other.mlp.get(i, [])))
        return counts


def _mask(units: list[int]) -> str:
    return hex(sum(1 << u for u in units))


def _units(mask: str) -> list[int]:
    bits = int(mask, 16)
    return [u for u in range(bits.bit_length()) if bits >> u & 1]


DEFAULT_RATIO = 0.25  # LLM-Pruner's usual ratio: ~20% of LLaMA-7B's parameters over layers 4..29


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise AdaPrunerError(f"ratio {ratio} is outside (0, 1): pass the fraction of each group to remove, e.g. --ratio 0.25")


def top_units(scores: torch.Tensor, n_keep: int) -> list[int]:
    """Indices of the `n_keep` highest scores, ascending; ties go to the lower index."""
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices  # stable: equal scores keep index order
    return sorted(order[:n_keep].tolist())


def plan_pruning(
    model: nn.Module,
    importance: Importance,
    ratio: float | Mapping[int, float],
    layers: range,
    granularity: AttnGranularity = "kv",
    prune_attention: bool = True,
    prune_mlp: bool = True,
) -> PrunePlan:
    """Score every group of `layers` and keep the best units; raise if a group would be emptied.

    `ratio` is one ratio for every layer or a ratio per layer index (a depth profile).
    """
    per_layer = {index: ratio for index in layers} if isinstance(ratio, (int, float)) else dict(ratio)
    for layer_ratio in per_layer.values():
        check_ratio(layer_ratio)
    counts = ratio_counts(model, layers, per_layer, granularity, prune_attention, prune_mlp)
    for index, (n_attn, n_mlp) in counts.items():
        info = layer_info(model, index)
        if prune_attention:
            _check_attention_removal(info, per_layer[index], n_attn, granularity)
        if prune_mlp and n_mlp >= info.intermediate:
            raise AdaPrunerError(f"ratio {per_layer[index]} would remove all {info.intermediate} MLP channels of layer {index}: use a smaller --ratio")
    every = {index: (prune_attention, prune_mlp) for index in layers}
    return plan_from_counts(model, score_layers(model, importance, every, granularity), counts, granularity)


def plan_allocation(
    model: nn.Module,
    importance: Importance,
    layers: range,
    granularity: AttnGranularity = "kv",
    prune_attention: bool = True,
    prune_mlp: bool = True,
    allocation: str = "uniform",
    ratio: float | None = DEFAULT_RATIO,
    target_params: float | None = None,
    slope: float = 0.0,
    min_keep: float = DEFAULT_MIN_KEEP,
    same_size: bool = False,
) -> PrunePlan:
    """The plan of an allocation (see `adapruner.allocation`): by `ratio` (LLM-Pruner's meaning; `global` then
    removes as many parameters as `uniform` would) or under the budget `target_params`; `same_size` keeps every
    pruned layer one size (uniform allocation only: a stock-config save)."""
    check_allocation(allocation)
    slope = slope if allocation == "depth" else 0.0
    if target_params is None and allocation != "global":
        check_ratio(ratio)
        per_layer = depth_profile(ratio, layers, slope) if slope else ratio
        return plan_pruning(model, importance, per_layer, layers, granularity, prune_attention, prune_mlp)
    every = {index: (prune_attention, prune_mlp) for index in layers}
    if target_params is not None:
        target = target_count(model, target_params)
    else:
        check_ratio(ratio)
        target = removed_by(model, ratio_counts(model, layers, ratio, granularity, prune_attention, prune_mlp), granularity)
    scores = score_layers(model, importance, every, granularity)
    if allocation == "global":
        counts = global_counts(model, scores, layers, target, granularity, min_keep, prune_attention, prune_mlp)
    else:
        counts = budget_counts(model, layers, target, depth_weights(layers, slope), granularity, prune_attention, prune_mlp, same_size)
    return plan_from_counts(model, scores, counts, granularity)


def score_layers(model: nn.Module, importance: Importance, which: Mapping[int, tuple[bool, bool]], granularity: AttnGranularity) -> dict[tuple[int, str], torch.Tensor]:
    """Unit scores of the modules that `which` ({layer: (prune attention, prune mlp)}) names."""
    scores = {}
    for index, (attention, mlp) in which.items():
        info = layer_info(model, index)
        if attention:
            scores[(index, "attn")] = importance(attention_group(info, granularity))
        if mlp:
            scores[(index, "mlp")] = importance(mlp_group(info))
    return scores


def plan_from_counts(model: nn.Module, scores: Mapping[tuple[int, str], torch.Tensor], counts: Counts, granularity: AttnGranularity) -> PrunePlan:
    """Keep the best-scored units of every scored module: all but `counts[layer]` (attention units, MLP channels)."""
    plan = PrunePlan()
    for index, (n_attn, n_mlp) in counts.items():
        info = layer_info(model, index)
        if (index, "attn") in scores:
            plan.attention[index] = _kept_attention(info, scores[(index, "attn")], n_attn, granularity)
        if (index, "mlp") in scores:
            if n_mlp >= info.intermediate:
                raise AdaPrunerError(f"the plan would remove all {info.intermediate} MLP channels of layer {index}: prune less")
            plan.mlp[index] = top_units(scores[(index, "mlp")], info.intermediate - n_mlp) if n_mlp else list(range(info.intermediate))
    return plan


def depth_profile(ratio: float, layers: range, slope: float) -> dict[int, float]:
    """Per-layer ratios r_l = r · (1 + slope · (2·p_l − 1)), p_l = position of l in `layers` from 0 to 1.

    slope 0 is uniform; slope > 0 prunes deep layers more than shallow ones; the mean ratio stays r.
    """
    return {index: ratio * w for index, w in depth_weights(layers, slope).items()}


def _check_attention_removal(info: LayerInfo, ratio: float, n_remove: int, granularity: AttnGranularity) -> None:
    unit_total = attention_units(info, granularity)
    if n_remove >= unit_total:
        what = "key/value groups" if granularity == "kv" else "query heads of a kv group"
        raise AdaPrunerError(f"ratio {ratio} would remove all {unit_total} {what} of layer {info.index}: use a smaller --ratio")
    if n_remove == 0:
        warnings.warn(
            f"ratio {ratio} removes no attention unit ({unit_total} per layer at granularity {granularity!r}): attention stays whole; "
            f"raise --ratio{', use --attn-granularity query,' if granularity == 'kv' else ''} or use --target-params to move the budget to the MLP",
            stacklevel=4,
        )


def _kept_attention(info: LayerInfo, scores: torch.Tensor | None, n_remove: int, granularity: AttnGranularity) -> tuple[list[int], list[int]]:
    r = info.heads_per_kv
    all_kv, all_q = list(range(info.n_kv_heads)), list(range(info.n_heads))
    if n_remove == 0:
        return all_q, all_kv
    if n_remove >= attention_units(info, granularity):
        raise AdaPrunerError(f"the plan would remove every attention unit of layer {info.index}: prune less")
    if granularity == "kv":
        keep_kv = top_units(scores, info.n_kv_heads - n_remove)
        return [h * r + j for h in keep_kv for j in range(r)], keep_kv
    keep_q = [h * r + j for h in all_kv for j in top_units(scores[h * r : (h + 1) * r], r - n_remove)]
    return keep_q, all_kv


def head_channels(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads: h·head_dim … (h+1)·head_dim - 1 for each h."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


Cut = tuple[nn.Module, str, "torch.Tensor | None", "torch.Tensor | None"]


def _layer_cuts(model: nn.Module, index: int, plan: PrunePlan) -> list[Cut]:
    """(owner, linear name, kept rows, kept columns) for every linear of layer `index` that the plan shrinks."""
    info = layer_info(model, index)
    cuts: list[Cut] = []
    if index in plan.attention:
        keep_q, keep_kv = plan.attention[index]
        if len(keep_q) < info.n_heads or len(keep_kv) < info.n_kv_heads:
            q_rows, kv_rows = head_channels(keep_q, info.head_dim), head_channels(keep_kv, info.head_dim)
            a, (q, k, v, o) = info.attn, ATTENTION_PROJECTIONS
            cuts += [(a, q, q_rows, None), (a, k, kv_rows, None), (a, v, kv_rows, None), (a, o, None, q_rows)]
    if index in plan.mlp and len(plan.mlp[index]) < info.intermediate:
        channels = torch.tensor(plan.mlp[index], dtype=torch.long)
        m, (gate, up, down) = info.mlp, MLP_PROJECTIONS
        cuts += [(m, gate, channels, None), (m, up, channels, None), (m, down, None, channels)]
    return cuts


def apply_plan(model: nn.Module, plan: PrunePlan, backend: Backend = "auto") -> None:
    """Remove every unit the plan does not keep, in place: one fused gather per layer (weights and biases).

    Keeps `num_key_value_groups` (GQA ratio) and `intermediate_size` of the modules consistent.
    """
    for index in sorted(set(plan.attention) | set(plan.mlp)):
        cuts = _layer_cuts(model, index, plan)
        if not cuts:
            continue
        specs = []
        with ExitStack() as loaded:  # offloaded weights are read on their execution device, one layer at a time
            for owner, name, rows, cols in cuts:
                linear = loaded.enter_context(weights(getattr(owner, name)))
                device = linear.weight.device
                rows, cols = (None if t is None else t.to(device) for t in (rows, cols))
                specs.append((linear.weight.detach(), rows, cols))
                if linear.bias is not None:
                    specs.append((linear.bias.detach(), rows, None))
            gathered = iter(gather(specs, backend))
        for owner, name, _rows, _cols in cuts:
            old = getattr(owner, name)
            weight = next(gathered)
            bias = next(gathered) if old.bias is not None else None
            setattr(owner, name, place_like(_linear_from(weight, bias), old))
        info = layer_info(model, index)
        info.attn.num_key_value_groups = info.heads_per_kv
        info.mlp.intermediate_size = info.intermediate


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear that owns `weight` (out × in) and `bias` without copying them again."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=True)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=True)
    return linear


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
        if index in plan.mlp:
            removed += (info.intermediate - len(plan.mlp[index])) * channel
    return removed


def removed_params(model: nn.Module, ratio: float, layers: range, granularity: AttnGranularity, prune_attention: bool = True, prune_mlp: bool = True) -> int:
    """Parameters that pruning at `ratio` removes (from shapes alone; selection does not change the count)."""
    return removed_by(model, ratio_counts(model, layers, ratio, granularity, prune_attention, prune_mlp), granularity)


def max_ratio(model: nn.Module, layers: range, granularity: AttnGranularity) -> float:
    """The largest ratio (to 1e-6) that empties no group."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if _empties_a_group(model, mid, layers, granularity):
            hi = mid
        else:
            lo = mid
    return lo


def _empties_a_group(model: nn.Module, ratio: float, layers: range, granularity: AttnGranularity) -> bool:
    return empties_a_group(model, ratio_counts(model, layers, ratio, granularity), granularity)


def solve_ratio(model: nn.Module, target: float, layers: range, granularity: AttnGranularity = "kv", prune_attention: bool = True, prune_mlp: bool = True) -> float:
    """Smallest ratio whose pruning removes at least `target` of all parameters (bisection on the step function)."""
    if not 0.0 < target < 1.0:
        raise AdaPrunerError(f"--target-params {target} is outside (0, 1): pass the fraction of all parameters to remove, e.g. 0.2")
    total = count_params(model)
    goal = target * total
    hi = max_ratio(model, layers, granularity)
    reachable = removed_params(model, hi, layers, granularity, prune_attention, prune_mlp)
    if reachable < goal:
        raise AdaPrunerError(
            f"--target-params {target} is out of reach: layers {layers.start}:{layers.stop} hold at most {reachable / total:.3f} of the parameters; widen --layers or lower the target"
        )
    lo = 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if removed_params(model, mid, layers, granularity, prune_attention, prune_mlp) >= goal:
            hi = mid
        else:
            lo = mid
    return hi
