"""How many units each pruned layer loses: `uniform` (one ratio), `depth` (a ratio that grows or shrinks with
depth), `global` (one ranking of standardised scores across layers and modules under a parameter budget), `error`
or `loss` (the refit's output error, or the loss increase it costs, per parameter).

Counts are {layer: (attention units removed, MLP channels removed)}. An attention unit is a kv group (granularity
`kv`: its r query heads, its k/v heads) or one query head inside every kv group (`query`). Prices, the parameters a
unit carries (hd: head_dim, r: query heads per kv head, qb/kb/gb: 1 where q / k,v / gate,up have biases):
    kv unit      r·hd·(2·hidden + qb) + 2·hd·(hidden + kb)       (q rows and o columns of r heads, k and v rows)
    query unit   n_kv·hd·(2·hidden + qb)
    MLP channel  3·hidden + 2·gb                                  (gate and up rows, down column)
Ratio mode (LLM-Pruner's meaning): a group of n units loses round(r_l·n), r_l = r (uniform) or
r·(1 + slope·(2p_l − 1)) with p_l the layer's position in the range from 0 to 1 (depth).
Budget mode (`target_params` p): T = ⌈p·N⌉ parameters of the model's N go, whatever the allocation:
    uniform/depth: r = T / (the range's prunable parameters, weighted); attention loses round(r·w_l·n) units per
        layer (fewer where that alone passes T); the MLP fills the rest with channel counts ∝ w_l, then gives channels
        back one at a time while the removal stays ≥ T — within one MLP channel of T (one attention unit with
        --no-mlp, where units are added to the layers losing least);
    global: per layer and module, unit scores s are standardised, z = (s − mean s)/std s; units go in ascending z
        over all layers and modules until T is reached, each module keeping ⌈min_keep·n⌉ units (none at min_keep 0:
        the block goes); a candidate that would pass T by more than the cheapest unit (an MLP channel) is passed over,
        so the plan ends within one MLP channel of T.
        With query granularity the k-th candidate of a layer is every kv group's k-th weakest head, at their mean z;
    error: each module's greedy OBS removal (`adapruner.scoring.obs`, in the metric's order) gives its relative output
        error e(k) after the damped refit with k units gone (over the output's energy tr(W H Wᵀ)); units go one at a
        time where the next one adds the least error per parameter, Δe / price, over all layers and modules, until T is
        reached (same floor and finish as global);
    loss: as error, but each module's error is weighted by the loss's sensitivity to its outputs and not normalised:
        e(k) = Σ_r f_r δ_r² with f_r = mean (∂L/∂y_r)² over the calibration tokens (the output Fisher,
        `collect.collect_output_fisher`), twice the loss increase to second order — so units go where the
        *estimated loss* per parameter grows least, across layers whose outputs matter unequally.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import NoReturn

import torch
from torch import nn

from adapruner.choosing.spec import AttnGranularity, PruneSpec, check_target_params
from adapruner.errors import AdaPrunerError
from adapruner.model.big_model import unique_tensors
from adapruner.model.structure import LayerInfo, layer_info, unit_params

Counts = dict[int, tuple[int, int]]
Scores = Mapping[
    tuple[int, str], torch.Tensor
]  # (layer, "attn" | "mlp") → unit scores (attn: per kv group, or per query head)


def count_params(model: nn.Module) -> int:
    """Parameters of the model, tied weights counted once (also once an offloaded model has run)."""
    return sum(p.numel() for _name, p in unique_tensors(model))


def attention_units(info: LayerInfo, granularity: AttnGranularity) -> int:
    """Attention units of a layer: kv groups (`kv`) or query heads per kv group (`query`)."""
    return info.n_kv_heads if granularity == "kv" else info.heads_per_kv


def prices(info: LayerInfo, granularity: AttnGranularity) -> tuple[int, int]:
    """(parameters of one attention unit, parameters of one MLP channel) of a layer (see the module docstring)."""
    q_head, kv_head, channel = unit_params(info)
    attention = info.heads_per_kv * q_head + kv_head if granularity == "kv" else info.n_kv_heads * q_head
    return attention, channel


def removed_by(model: nn.Module, counts: Counts, granularity: AttnGranularity) -> int:
    """Parameters that `counts` remove (from shapes alone), a removed attention block's kv heads included."""
    total = 0
    for index, (n_attn, n_mlp) in counts.items():
        info = layer_info(model, index)
        attention, channel = prices(info, granularity)
        whole = n_attn and n_attn == attention_units(info, granularity)
        total += n_attn * attention + n_mlp * channel + (block_bonus(info, granularity) if whole else 0)
    return total


def block_bonus(info: LayerInfo, granularity: AttnGranularity) -> int:
    """Parameters a removed attention block frees beyond its units' prices: its kv heads at `query` granularity
    (a query unit keeps them), none at `kv`."""
    return info.n_kv_heads * unit_params(info)[1] if granularity == "query" else 0


def ratio_counts(
    model: nn.Module,
    layers: range,
    ratio: float | Mapping[int, float],
    granularity: AttnGranularity,
    prune_attention: bool = True,
    prune_mlp: bool = True,
    align: int = 1,
) -> Counts:
    """round(r_l · n) per group (LLM-Pruner's meaning of a ratio); `ratio` is one ratio or one per layer. With `align`
    the MLP loses round(r_l · I / align) blocks of `align` channels."""
    per_layer = {index: ratio for index in layers} if isinstance(ratio, (int, float)) else ratio
    counts = {}
    for index in layers:
        info = layer_info(model, index)
        r = per_layer[index]
        counts[index] = (
            removal_count(attention_units(info, granularity), r) if prune_attention else 0,
            removal_count(info.intermediate // align, r) * align if prune_mlp else 0,
        )
    return counts


def removal_count(n_units: int, ratio: float) -> int:
    """Units removed from a group of `n_units`: round(ratio · n_units)."""
    return int(round(ratio * n_units))


def depth_weights(layers: range, slope: float) -> dict[int, float]:
    """w_l = 1 + slope·(2p_l − 1), p_l the position of l in `layers` from 0 to 1 (mean 1)."""
    n = len(layers)
    return {index: 1 + slope * (2 * k / (n - 1) - 1 if n > 1 else 0.0) for k, index in enumerate(layers)}


def target_count(model: nn.Module, target_params: float) -> int:
    """T = ⌈p · N⌉ parameters to remove."""
    check_target_params(target_params)
    return math.ceil(target_params * count_params(model))


def budget_counts(
    model: nn.Module, layers: range, target: int, weights: Mapping[int, float], spec: PruneSpec
) -> Counts:
    """uniform/depth under a budget of `target` parameters (see the module docstring), as `spec` prunes (granularity,
    modules, `align`: MLP units are blocks of that many channels). `same_size` (uniform weights, for a stock-config
    save): units are given back from every layer at once, so all layers keep one size."""
    granularity, same_size, align = spec.granularity, spec.same_size, spec.align
    prune_attention, prune_mlp = spec.prune_attention, spec.prune_mlp
    infos = {index: layer_info(model, index) for index in layers}
    price = {index: _aligned(prices(info, granularity), align) for index, info in infos.items()}
    units = {index: (attention_units(info, granularity), info.intermediate // align) for index, info in infos.items()}
    on = (prune_attention, prune_mlp)
    capacity = sum(w * sum(units[i][k] * price[i][k] for k in (0, 1) if on[k]) for i, w in weights.items())
    ratio = target / capacity  # the base ratio if units could be cut in fractions
    counts = {
        i: [min(units[i][k] - 1, round(ratio * weights[i] * units[i][k])) if on[k] else 0 for k in (0, 1)]
        for i in layers
    }

    def removed(kinds: tuple[int, ...] = (0, 1)) -> int:
        return sum(counts[i][k] * price[i][k] for i in layers for k in kinds)

    def most(k: int) -> list[int]:
        """The layers to give a unit of kind k back from: the one losing most (all of them with `same_size`)."""
        if same_size:
            return list(layers)
        return [max(layers, key=lambda i: (counts[i][k] / weights[i] if weights[i] > 0 else math.inf, i))]

    def give_back(k: int) -> None:
        while True:  # one unit at a time (one per layer with same_size) while the budget still holds
            chosen = most(k)
            if any(counts[i][k] == 0 for i in chosen) or removed() - sum(price[i][k] for i in chosen) < target:
                return
            for i in chosen:
                counts[i][k] -= 1

    if prune_mlp:
        while removed((0,)) > target and all(counts[i][0] for i in most(0)):  # attention alone passes the budget
            for i in most(0):
                counts[i][0] -= 1
        lo, hi = 0.0, 1.0 / max(weights.values())  # the MLP fills the rest with channel counts ∝ the layer weights
        fill = {i: counts[i][0] for i in layers}

        def with_scale(scale: float) -> None:
            for i in layers:
                counts[i] = [fill[i], min(units[i][1] - 1, round(scale * weights[i] * units[i][1]))]

        with_scale(hi)
        if removed() < target:
            _out_of_reach(model, target, removed(), layers)
        for _ in range(50):
            mid = (lo + hi) / 2
            with_scale(mid)
            lo, hi = (lo, mid) if removed() >= target else (mid, hi)
        with_scale(hi)
        give_back(1)
    else:
        while removed() < target:  # attention only: take units, one at a time from the layers losing least
            open_layers = [i for i in layers if counts[i][0] < units[i][0] - 1]
            if not open_layers or (same_size and len(open_layers) < len(layers)):
                _out_of_reach(model, target, removed(), layers)
            least = min(open_layers, key=lambda i: (counts[i][0] / weights[i] if weights[i] > 0 else math.inf, -i))
            for i in open_layers if same_size else [least]:
                counts[i][0] += 1
        give_back(0)
    return {i: (a, m * align) for i, (a, m) in counts.items()}


def _aligned(unit_prices: tuple[int, int], align: int) -> tuple[int, int]:
    """(attention unit, MLP block of `align` channels) prices."""
    return unit_prices[0], unit_prices[1] * align


def kept_at_least(units: int, min_keep: float) -> int:
    """The fewest of a module's `units` a layer keeps under a scored allocation: ⌈min_keep · units⌉ (at least one for
    any min_keep > 0; 0 lets the whole block go — a removed attention or MLP block)."""
    return math.ceil(min_keep * units)


def _short_of_target(model: nn.Module, target: int, removed: int, min_keep: float) -> NoReturn:
    """The one-line error of a budget the `--min-keep` floor leaves out of reach (`removed` is the most it allows)."""
    total = count_params(model)
    raise AdaPrunerError(
        f"--target-params {target / total:.3f} is out of reach with --min-keep {min_keep}: "
        f"at most {removed / total:.3f}; lower --min-keep or the target, or widen --layers"
    )


def _out_of_reach(model: nn.Module, target: int, reachable: int, layers: range):
    total = count_params(model)
    raise AdaPrunerError(
        f"--target-params {target / total:.3f} is out of reach: layers {layers.start}:{layers.stop} give at most "
        f"{reachable / total:.3f} of the parameters; widen --layers or lower the target"
    )


def candidate_costs(
    scores: torch.Tensor, info: LayerInfo, module: str, granularity: AttnGranularity, align: int = 1
) -> torch.Tensor:
    """Standardised scores of a module's removal candidates, ascending (see the module docstring); MLP candidates are
    blocks of `align` channels, each at the mean z of its channels (the weakest `align`, the next `align`, …)."""
    s = scores.double().cpu()
    std = s.std() if s.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    z = (s - s.mean()) / std if std > 0 else torch.zeros_like(s)
    if module == "attn" and granularity == "query":  # the k-th candidate: every kv group's k-th weakest head
        return z.view(info.n_kv_heads, info.heads_per_kv).sort(1).values.mean(0)
    if module == "mlp" and info.experts is not None:  # the k-th candidate: every expert's k-th weakest channel
        costs = z.view(info.n_experts, info.intermediate).sort(1).values.mean(0)
    else:
        costs = z.sort().values
    return costs.view(-1, align).mean(1) if module == "mlp" else costs


def error_counts(
    model: nn.Module, curves: Mapping[tuple[int, str], torch.Tensor], layers: range, target: int, spec: PruneSpec
) -> Counts:
    """`error` allocation under a budget of `target` parameters (see the module docstring): `curves[(layer, module)]`
    holds the error after k removal units (MLP: blocks of `spec.align` channels), k = 0 … the most it may lose."""
    price = {}
    for index in layers:
        attention, channel = _aligned(prices(layer_info(model, index), spec.granularity), spec.align)
        price[(index, "attn")], price[(index, "mlp")] = attention, channel
    counts = {key: 0 for key in curves}
    finest = min((price[key] for key in curves), default=0)
    values = {key: curve.tolist() for key, curve in curves.items()}  # Python floats: the loop below runs per unit

    def next_cost(key: tuple[int, str]) -> float:
        k, curve = counts[key], values[key]
        return ((curve[k + 1] - curve[k]) / price[key], key[0], key[1]) if k + 1 < len(curve) else None

    removed = 0
    heap = [(cost, key) for key in curves if (cost := next_cost(key)) is not None]
    heapq.heapify(heap)
    while heap and removed < target:
        _cost, key = heapq.heappop(heap)
        if removed + price[key] > target + finest:  # passes the budget by more than the finest unit: cheaper ones fill
            continue
        counts[key] += 1
        removed += price[key]
        if (cost := next_cost(key)) is not None:
            heapq.heappush(heap, (cost, key))
    if removed < target:
        _short_of_target(model, target, removed, spec.min_keep)
    return {i: (counts.get((i, "attn"), 0), counts.get((i, "mlp"), 0) * spec.align) for i in layers}


def global_counts(model: nn.Module, scores: Scores, layers: range, target: int, spec: PruneSpec) -> Counts:
    """`global` allocation under a budget of `target` parameters (see the module docstring), as `spec` prunes
    (granularity, modules, `min_keep`, `align`)."""
    granularity, min_keep, align = spec.granularity, spec.min_keep, spec.align
    prune_attention, prune_mlp = spec.prune_attention, spec.prune_mlp
    if not 0.0 <= min_keep < 1.0:
        raise AdaPrunerError(
            f"--min-keep {min_keep} is outside [0, 1): pass the fraction of each module a layer keeps at least"
        )
    candidates = []  # (z, layer, module index, price)
    for index in layers:
        info = layer_info(model, index)
        attention, channel = _aligned(prices(info, granularity), align)
        for slot, (module, units, price, on) in enumerate(
            (
                ("attn", attention_units(info, granularity), attention, prune_attention),
                ("mlp", info.intermediate // align, channel, prune_mlp),
            )
        ):
            if not on:
                continue
            costs = candidate_costs(scores[(index, module)], info, module, granularity, align)
            costs = costs[: units - kept_at_least(units, min_keep)]
            candidates += [(float(z), index, slot, price) for z in costs]
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    counts = {index: [0, 0] for index in layers}
    removed, finest = 0, min((c[3] for c in candidates), default=0)
    for _z, index, slot, price in candidates:
        if removed >= target:
            break
        if removed + price > target + finest:  # passes the budget by more than the finest unit: cheaper ones fill it
            continue  # (a module's candidates share one price, so its later ones are passed over too)
        counts[index][slot] += 1
        removed += price
    if removed < target:
        _short_of_target(model, target, removed, min_keep)
    return {index: (a, m * align) for index, (a, m) in counts.items()}
