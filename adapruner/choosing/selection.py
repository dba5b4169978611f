"""Choose the units to keep from importance scores: per group, per layer, under an allocation (see
`adapruner.choosing.allocation` for how many units each layer loses).

Ratio semantics (LLM-Pruner's): `ratio` r removes round(r · n) units of each pruned group — kv groups (or query
heads inside every kv group) of attention, channels of the MLP — in every layer of the pruned range.
`--target-params p` is a parameter budget instead (`adapruner.choosing.allocation`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from adapruner.choosing.allocation import (
    Counts,
    Scores,
    attention_units,
    budget_counts,
    depth_weights,
    error_counts,
    global_counts,
    kept_at_least,
    ratio_counts,
    removed_by,
    target_count,
)
from adapruner.choosing.allocation_rules import allocation
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.spec import AttnGranularity, PruneSpec, check_ratio
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import (
    LayerInfo,
    attention_group,
    decoder_layers,
    layer_info,
    mlp_group,
    parse_layer_range,
)
from adapruner.scoring.importance import EXPERTS_BY_ERROR, Importance
from adapruner.scoring.obs import Removal, greedy_batch


def top_units(scores: torch.Tensor, n_keep: int) -> list[int]:
    """Indices of the `n_keep` highest scores, ascending; ties go to the lower index."""
    order = torch.sort(
        scores.detach().cpu(), descending=True, stable=True
    ).indices  # stable: equal scores keep index order
    return sorted(order[:n_keep].tolist())


def plan_pruning(
    model: nn.Module,
    importance: Importance,
    ratio: float | Mapping[int, float],
    layers: range,
    granularity: AttnGranularity = "kv",
    prune_attention: bool = True,
    prune_mlp: bool = True,
    align: int = 1,
) -> PrunePlan:
    """Score every group of `layers` and keep the best units; raise if a group would be emptied.

    `ratio` is one ratio for every layer or a ratio per layer index (a depth profile); MLP widths are kept in
    multiples of `align` channels.
    """
    counts = checked_ratio_counts(model, ratio, layers, granularity, prune_attention, prune_mlp, align)
    every = {index: (prune_attention, prune_mlp) for index in layers}
    return plan_from_counts(model, choosing_scores(model, importance, every, counts, granularity), counts, granularity)


def checked_ratio_counts(
    model: nn.Module,
    ratio: float | Mapping[int, float],
    layers: range,
    granularity: AttnGranularity,
    prune_attention: bool,
    prune_mlp: bool,
    align: int,
) -> Counts:
    """`allocation.ratio_counts`, refusing in one line a ratio that would empty a group."""
    per_layer = {index: ratio for index in layers} if isinstance(ratio, (int, float)) else dict(ratio)
    for layer_ratio in per_layer.values():
        check_ratio(layer_ratio)
    if prune_mlp:
        check_align(model, layers, align)
    counts = ratio_counts(model, layers, per_layer, granularity, prune_attention, prune_mlp, align)
    for index, (n_attn, n_mlp) in counts.items():
        info = layer_info(model, index)
        if prune_attention:
            _check_attention_removal(info, per_layer[index], n_attn, granularity)
        if prune_mlp and n_mlp >= info.intermediate:
            raise AdaPrunerError(
                f"ratio {per_layer[index]} would remove all {info.intermediate} MLP channels of layer {index}: "
                "use a smaller --ratio"
            )
    return counts


def plan_allocation(model: nn.Module, importance: Importance, spec: PruneSpec) -> PrunePlan:
    """The plan of `spec`'s allocation (see `adapruner.choosing.allocation`) over its layers: by ratio (LLM-Pruner's
    meaning; `global` and `error` then remove as many parameters as `uniform` would) or under the budget
    `target_params`; `same_size` keeps every pruned layer one size (uniform allocation only: a stock-config save)."""
    counts, scores = allocate(model, importance, spec)
    return plan_from_counts(model, scores, counts, spec.granularity)


def allocate(model: nn.Module, importance: Importance, spec: PruneSpec) -> tuple[Counts, Scores]:
    """The units each layer loses under `spec`'s allocation, and the unit scores that choose them
    (`choosing_scores`)."""
    spec.check()
    layers = parse_layer_range(spec.layers, len(decoder_layers(model)))
    granularity = spec.granularity
    every = {index: (spec.prune_attention, spec.prune_mlp) for index in layers}
    counts = scoreless_counts(model, spec, layers)
    if counts is not None:
        return counts, choosing_scores(model, importance, every, counts, granularity)
    target = allocation_target(model, spec, layers)
    surgeon = importance.definition.surgeon
    rule = allocation(spec.allocation)
    if rule.counts == "ranked":
        scores = score_layers(model, importance, every, granularity)
        counts = global_counts(model, scores, layers, target, spec)
        return counts, choosing_scores(model, importance, every, counts, granularity) if surgeon else scores
    scores = None if surgeon else score_layers(model, importance, every, granularity)  # obs: the orders below choose
    removals = error_removals(model, importance, every, spec, scores)
    curves = removal_curves(removals, spec.align, relative=rule.relative)
    counts = error_counts(model, curves, layers, target, spec)
    return counts, scores if scores is not None else {key: removal.ranks() for key, removal in removals.items()}


def scoreless_counts(model: nn.Module, spec: PruneSpec, layers: range) -> Counts | None:
    """The counts of the `uniform` and `depth` allocations, which read no score (None for `global` and `error`)."""
    if allocation(spec.allocation).scored:
        return None
    granularity, attention, mlp = spec.granularity, spec.prune_attention, spec.prune_mlp
    if spec.target_params is None:
        per_layer = depth_profile(spec.ratio, layers, spec.slope) if spec.slope else spec.ratio
        return checked_ratio_counts(model, per_layer, layers, granularity, attention, mlp, spec.align)
    if mlp:
        check_align(model, layers, spec.align)
    target = target_count(model, spec.target_params)
    return budget_counts(model, layers, target, depth_weights(layers, spec.slope), spec)


def allocation_target(model: nn.Module, spec: PruneSpec, layers: range) -> int:
    """Parameters a scored allocation removes: the budget, or what `uniform` removes at the ratio."""
    if spec.prune_mlp:
        check_align(model, layers, spec.align)
    if spec.target_params is not None:
        return target_count(model, spec.target_params)
    counts = ratio_counts(model, layers, spec.ratio, spec.granularity, spec.prune_attention, spec.prune_mlp, spec.align)
    return removed_by(model, counts, spec.granularity)


def choosing_scores(
    model: nn.Module,
    importance: Importance,
    which: Mapping[int, tuple[bool, bool]],
    counts: Counts,
    granularity: AttnGranularity,
) -> Scores:
    """The scores that choose the units of the modules `which` names once `counts` are known: the metric's unit
    scores (`score_layers`), or for `obs` each module's greedy OBS removal order (the refit between steps,
    `Removal.ranks`) of as many units as `counts` removes, so the plan keeps the rest."""
    if not importance.definition.surgeon:
        return score_layers(model, importance, which, granularity)
    ranked = {}
    for index, on in which.items():
        info = layer_info(model, index)
        for slot, module in enumerate(("attn", "mlp")):
            if on[slot]:
                removal = _removal(info, importance, (module, counts[index][slot]), granularity)
                ranked[(index, module)] = removal.ranks()
    return ranked


def _removal(
    info: LayerInfo,
    importance: Importance,
    what: tuple[str, int],
    granularity: AttnGranularity,
    priority: torch.Tensor | None = None,
    loss_weighted: bool = False,
) -> Removal:
    """The greedy OBS removal of `what` = (module, n units) (allocation units: kv groups, query heads per kv group,
    MLP channels), in the order of `priority` where given (see `Importance.removal`)."""
    module, n = what
    if module == "attn":
        groups = info.n_kv_heads if granularity == "query" else 1
        return importance.removal(
            attention_group(info, granularity), n, groups, priority=priority, loss_weighted=loss_weighted
        )
    batch = greedy_batch(info.intermediate)
    return importance.removal(mlp_group(info), n, batch=batch, priority=priority, loss_weighted=loss_weighted)


def error_removals(
    model: nn.Module,
    importance: Importance,
    which: Mapping[int, tuple[bool, bool]],
    spec: PruneSpec,
    scores: Scores | None = None,
) -> dict[tuple[int, str], Removal]:
    """Per module of `which`, the greedy OBS removal (in `importance`'s order: its `scores` where at hand) of every
    unit it may lose: all but ⌈min_keep · n⌉ (every unit at min_keep 0; MLP channels in whole blocks of `align`);
    loss-weighted (`Importance.removal`) under `spec.allocation` `loss`."""
    removals, loss = {}, allocation(spec.allocation).output_fisher
    for index, (attention, mlp) in which.items():
        info = layer_info(model, index)
        if mlp and info.experts is not None:
            raise AdaPrunerError(EXPERTS_BY_ERROR)
        if attention:
            units = attention_units(info, spec.granularity)
            n = units - kept_at_least(units, spec.min_keep)
            priority = None if scores is None else scores[(index, "attn")]
            removals[(index, "attn")] = _removal(info, importance, ("attn", n), spec.granularity, priority, loss)
        if mlp:
            blocks = info.intermediate // spec.align
            n = (blocks - kept_at_least(blocks, spec.min_keep)) * spec.align
            priority = None if scores is None else scores[(index, "mlp")]
            removals[(index, "mlp")] = _removal(info, importance, ("mlp", n), spec.granularity, priority, loss)
    return removals


def removal_curves(
    removals: Mapping[tuple[int, str], Removal], align: int = 1, relative: bool = True
) -> dict[tuple[int, str], torch.Tensor]:
    """Error after k removal units, k = 0 …: the cumulative OBS cost, `relative` over the module's output energy
    `Removal.energy` (a step of m units adds its cost in m equal parts; MLP units are blocks of `align` channels)."""
    curves = {}
    for (index, module), removal in removals.items():
        if module == "attn":  # one step per attention unit (a kv group, or one head of every kv group)
            increments = removal.costs
        else:
            increments = [c / len(units) for units, c in zip(removal.steps, removal.costs) for _ in units]
        curve = torch.cumsum(torch.tensor([0.0, *increments], dtype=torch.float64), 0)
        if relative:  # the fraction of the module's output variance lost
            curve = curve / removal.energy
        curves[(index, module)] = curve[::align] if module == "mlp" else curve
    return curves


def check_align(model: nn.Module, layers: range, align: int) -> None:
    """`align` must divide every pruned layer's MLP width (of each expert in a MoE layer): one line otherwise."""
    for index in layers:
        width = layer_info(model, index).intermediate
        if width % align:
            raise AdaPrunerError(
                f"--align {align} does not divide layer {index}'s {width} MLP channels: pass a divisor of it (e.g. 64)"
            )


def score_layers(
    model: nn.Module, importance: Importance, which: Mapping[int, tuple[bool, bool]], granularity: AttnGranularity
) -> dict[tuple[int, str], torch.Tensor]:
    """Unit scores of the modules that `which` ({layer: (prune attention, prune mlp)}) names."""
    scores = {}
    for index, (attention, mlp) in which.items():
        info = layer_info(model, index)
        if attention:
            scores[(index, "attn")] = importance(attention_group(info, granularity))
        if mlp:
            scores[(index, "mlp")] = importance(mlp_group(info))
    return scores


def plan_from_counts(
    model: nn.Module, scores: Mapping[tuple[int, str], torch.Tensor], counts: Counts, granularity: AttnGranularity
) -> PrunePlan:
    """Keep the best-scored units of every scored module: all but `counts[layer]` (attention units, MLP channels). A
    count of every unit removes the block: an attention block keeps no query and no kv heads, an MLP no channels."""
    plan = PrunePlan()
    for index, (n_attn, n_mlp) in counts.items():
        info = layer_info(model, index)
        if (index, "attn") in scores:
            plan.attention[index] = _kept_attention(info, scores[(index, "attn")], n_attn, granularity)
        if (index, "mlp") in scores:
            if n_mlp >= info.intermediate and info.experts is not None:
                raise AdaPrunerError(
                    f"the plan would remove all {info.intermediate} channels of layer {index}'s experts: prune less "
                    "(a MoE layer keeps its experts; raise --min-keep above 0)"
                )
            plan.mlp[index] = _kept_channels(info, scores[(index, "mlp")], n_mlp)
    return plan


def _kept_channels(info: LayerInfo, scores: torch.Tensor, n_remove: int) -> list[int]:
    """The best `I − n_remove` channels; in a MoE layer the best of each expert's own channels (units e·I + c)."""
    if not n_remove:
        return list(range(info.mlp_units))
    inter = info.intermediate
    if info.experts is None:
        return top_units(scores, inter - n_remove)
    return [
        e * inter + c
        for e in range(info.n_experts)
        for c in top_units(scores[e * inter : (e + 1) * inter], inter - n_remove)
    ]


def depth_profile(ratio: float, layers: range, slope: float) -> dict[int, float]:
    """Per-layer ratios r_l = r · (1 + slope · (2·p_l − 1)), p_l = position of l in `layers` from 0 to 1.

    slope 0 is uniform; slope > 0 prunes deep layers more than shallow ones; the mean ratio stays r.
    """
    return {index: ratio * w for index, w in depth_weights(layers, slope).items()}


def _check_attention_removal(info: LayerInfo, ratio: float, n_remove: int, granularity: AttnGranularity) -> None:
    unit_total = attention_units(info, granularity)
    if n_remove >= unit_total:
        what = "key/value groups" if granularity == "kv" else "query heads of a kv group"
        raise AdaPrunerError(
            f"ratio {ratio} would remove all {unit_total} {what} of layer {info.index}: use a smaller --ratio"
        )
    if n_remove == 0:
        warnings.warn(
            f"ratio {ratio} removes no attention unit ({unit_total} per layer at granularity {granularity!r}): "
            "attention stays whole; "
            f"raise --ratio{', use --attn-granularity query,' if granularity == 'kv' else ''} "
            "or use --target-params to move the budget to the MLP",
            stacklevel=4,
        )


def _kept_attention(
    info: LayerInfo, scores: torch.Tensor | None, n_remove: int, granularity: AttnGranularity
) -> tuple[list[int], list[int]]:
    r = info.heads_per_kv
    all_kv, all_q = list(range(info.n_kv_heads)), list(range(info.n_heads))
    if n_remove == 0:
        return all_q, all_kv
    if n_remove >= attention_units(info, granularity):  # the block goes, its kv heads with it
        return [], []
    if granularity == "kv":
        keep_kv = top_units(scores, info.n_kv_heads - n_remove)
        return [h * r + j for h in keep_kv for j in range(r)], keep_kv
    keep_q = [h * r + j for h in all_kv for j in top_units(scores[h * r : (h + 1) * r], r - n_remove)]
    return keep_q, all_kv
