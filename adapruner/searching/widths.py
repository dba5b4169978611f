"""Per-layer widths as a search space (issue 33, first step): a trial chooses how much of each pruned layer's attention
and MLP goes under the parameter budget; which units go, and their refit, come from memoized layer variants.

Space: a share w_m ∈ [0, 1] per module m = (layer, attention | MLP), with n_m units of p_m parameters each (MLP
units: blocks of `align` channels) and a floor of ⌈min_keep · n_m⌉ kept units (0 at `--min-keep 0`: the block may
go). A trial's counts:
    c_m(s) = min(n_m − floor_m, round(s · w_m · n_m)),   s the least scale (bisection) with Σ_m R_m(c_m(s)) ≥ T,
R_m(c) = c · p_m, plus the kv heads b_m a removed attention block frees at `query` granularity when c = n_m,
then MLP blocks are given back one at a time, from the MLP losing the largest fraction, while the removal stays ≥ T:
every trial ends within one MLP block of the budget T. The shares of given counts, w_m = c_m / n_m, reproduce them at
s = 1 (how the `loss` allocation's counts enter a study as its first trial).
Variants: the units come from one importance's scores (computed once), each (layer, module, count)'s lsq refit from
one statistics source (the refit pool) the first time a trial asks for it, kept in host memory up to the memory
plan's bound (`memory_plan.variant_store_bytes`; the least recently used beyond it are dropped and solved again when
asked); a trial's assembled plan and refit equal a fresh prune with the same counts, scores and refit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from adapruner.choosing.allocation import Counts, attention_units, block_bonus, kept_at_least, prices, target_count
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import plan_from_counts, score_layers
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.compensation import Update, refit_updates
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import decoder_layers, layer_info, output_projections, parse_layer_range
from adapruner.scoring.sources import StatisticsSource

Module = tuple[int, str]  # (layer, "attn" | "mlp")


@dataclass(frozen=True)
class WidthSpace:
    """The modules a spec prunes, with their units n_m, unit prices p_m, floors, the parameters b_m their removal as a
    whole frees beyond the units' prices, and the budget T (module docstring)."""

    units: dict[Module, int]
    prices: dict[Module, int]
    floors: dict[Module, int]
    target: int
    align: int = 1
    bonus: dict[Module, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, spec: PruneSpec) -> WidthSpace:
        """The space of `spec` (a parameter budget: `target_params`) on `model`."""
        if spec.target_params is None:
            raise AdaPrunerError("a widths search spreads a parameter budget: pass --target-params")
        units, unit_prices, floors, bonus = {}, {}, {}, {}
        for index in parse_layer_range(spec.layers, len(decoder_layers(model))):
            info = layer_info(model, index)
            attention, channel = prices(info, spec.granularity)
            modules = {
                "attn": (spec.prune_attention, attention_units(info, spec.granularity), attention),
                "mlp": (spec.prune_mlp, info.intermediate // spec.align, channel * spec.align),
            }
            for kind, (on, n, price) in modules.items():
                if on:
                    units[(index, kind)], unit_prices[(index, kind)] = n, price
                    floors[(index, kind)] = kept_at_least(n, spec.min_keep)
            if spec.prune_attention:
                bonus[(index, "attn")] = block_bonus(info, spec.granularity)
        return cls(units, unit_prices, floors, target_count(model, spec.target_params), spec.align, bonus)

    def counts(self, shares: Mapping[Module, float]) -> Counts:
        """The counts of `shares` under the budget (module docstring)."""

        def at(scale: float) -> dict[Module, int]:
            return {m: min(n - self.floors[m], round(scale * shares[m] * n)) for m, n in self.units.items()}

        removed = self.removed
        if removed(at(1e12)) < self.target:  # every module with a share at its floor
            raise AdaPrunerError(
                f"these shares cannot remove {self.target:,} parameters above the --min-keep floors: give more "
                "modules a share or lower --target-params"
            )
        low, high = 0.0, 1.0
        while removed(at(high)) < self.target:
            low, high = high, high * 2
        for _ in range(50):
            middle = (low + high) / 2
            low, high = (low, middle) if removed(at(middle)) >= self.target else (middle, high)
        counts = at(high)
        mlps = [m for m in self.units if m[1] == "mlp"]
        while mlps:
            largest = max(mlps, key=lambda m: (counts[m] / self.units[m], m))
            if counts[largest] == 0 or removed(counts) - self.prices[largest] < self.target:
                break
            counts[largest] -= 1
        return self.layer_counts(counts)

    def shares(self, counts: Counts) -> dict[Module, float]:
        """w_m = c_m / n_m of given counts (they come back from `counts` at s = 1, up to the budget's last block)."""
        return {m: c / self.units[m] for m, c in self.module_counts(counts).items()}

    def removed(self, units: Mapping[Module, int]) -> int:
        """Parameters that removing `units[m]` units of each module m frees: Σ_m c_m · p_m, plus b_m where c_m = n_m."""
        return sum(c * self.prices[m] + (self.bonus.get(m, 0) if c == self.units[m] else 0) for m, c in units.items())

    def module_counts(self, counts: Counts) -> dict[Module, int]:
        """Units removed per module (MLP: blocks of `align` channels) of per-layer `counts`."""
        return {(i, kind): counts[i][0] if kind == "attn" else counts[i][1] // self.align for i, kind in self.units}

    def layer_counts(self, units: Mapping[Module, int]) -> Counts:
        """Per-layer (attention units, MLP channels) of units removed per module."""
        layers = sorted({index for index, _kind in self.units})
        return {i: (units.get((i, "attn"), 0), units.get((i, "mlp"), 0) * self.align) for i in layers}


def structure_bytes(model: nn.Module, layers: range) -> int:
    """At most what one structure's refit output linears hold in fp32 (every output projection of `layers` at its
    dense width, with its bias): the variants a trial assembles (a meta model will do)."""
    return sum(
        4 * (linear.in_features + 1) * linear.out_features for linear in output_projections(model, layers).values()
    )


class LayerVariants:
    """The units of every pruned module ranked once by `spec`'s metric from `statistics` (`importance`, kept for the
    allocation that starts a search), and each (layer, module, count)'s refit from `statistics`, computed the first
    time it is asked for and kept in host memory up to `store_bytes` (None: no bound), least recently used dropped
    first (an 8B shape's MLP variant is 235 MB in fp32: the device holds only the variants of the structure being
    scored, copied over by its cut)."""

    def __init__(
        self,
        model: nn.Module,
        spec: PruneSpec,
        statistics: StatisticsSource,
        seed: int = 0,
        store_bytes: int | None = None,
    ):
        self.importance = importance = statistics.importance(model, spec, seed)
        if importance.definition.surgeon:
            raise AdaPrunerError(
                f"a widths search ranks units once; metric {spec.metric} orders them anew for each count: use fluct"
            )
        layers = parse_layer_range(spec.layers, len(decoder_layers(model)))
        which = {index: (spec.prune_attention, spec.prune_mlp) for index in layers}
        self.model, self.spec, self.statistics = model, spec, statistics
        self.scores = score_layers(model, importance, which, spec.granularity)
        self.refits: OrderedDict[tuple[int, str, int], dict[str, Update]] = OrderedDict()
        self.store_bytes, self.held_bytes = store_bytes, 0

    def plan(self, counts: Counts) -> PrunePlan:
        """The kept units of `counts`: each module's best-scored ones."""
        return plan_from_counts(self.model, self.scores, counts, self.spec.granularity)

    def updates(self, counts: Counts) -> dict[str, Update]:
        """The refit output linears of `counts`, one (layer, module, count) at a time, each solved when not held."""
        updates, wanted = {}, set()
        for index, pair in counts.items():
            for kind, count in zip(("attn", "mlp"), pair):
                if (index, kind) not in self.scores:
                    continue
                key = (index, kind, count)
                wanted.add(key)
                if key in self.refits:
                    self.refits.move_to_end(key)
                else:
                    one = {(index, kind): self.scores[(index, kind)]}
                    alone = (count, 0) if kind == "attn" else (0, count)
                    part = plan_from_counts(self.model, one, {index: alone}, self.spec.granularity)
                    solved = refit_updates(self.model, part, self.statistics, self.spec.compensation, self.spec.damp)
                    self.refits[key] = {  # kept in host memory; a trial's cut copies its own over
                        name: tuple(t.to("cpu") for t in update) for name, update in solved.items()
                    }
                    self.held_bytes += _nbytes(self.refits[key])
                updates |= self.refits[key]
        self._drop_beyond_bound(wanted)
        return updates

    def _drop_beyond_bound(self, wanted: set[tuple[int, str, int]]) -> None:
        """Drop the least recently used variants, none of `wanted`, until the store is within its bound."""
        if self.store_bytes is None:
            return
        for key in [key for key in self.refits if key not in wanted]:
            if self.held_bytes <= self.store_bytes:
                return
            self.held_bytes -= _nbytes(self.refits.pop(key))


def _nbytes(updates: dict[str, Update]) -> int:
    return sum(t.numel() * t.element_size() for update in updates.values() for t in update)
