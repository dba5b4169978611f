"""The pruning spec: what to remove and how, one frozen value passed whole through prune, search trials, run and
`best.json`. Its vocabularies (allocations, compensations, aggregations, granularities) and defaults live here.

Exactly one of `ratio` (LLM-Pruner's meaning: the fraction of each pruned group removed) and `target_params` (the
fraction of the whole model's parameters removed) is set; `target_params` wins when both are given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

from adapruner.choosing.allocation_rules import DEFAULT_ALLOCATION, allocation
from adapruner.errors import AdaPrunerError
from adapruner.scoring.metrics import DEFAULT_METRIC
from adapruner.scoring.metrics import metric as registered

AttnGranularity = Literal["kv", "query"]
GRANULARITIES = ("kv", "query")
AGGREGATIONS = ("sum", "mean", "max", "prod", "first")
COMPENSATIONS = ("none", "bias", "lsq")
DEFAULT_RATIO = 0.25  # LLM-Pruner's usual ratio: ~20% of LLaMA-7B's parameters over layers 4..29
DEFAULT_MIN_KEEP = 0.25  # global: the fewest units of a module a layer keeps, as a fraction of the dense count
DEFAULT_OBS_DAMP = 0.01  # measured on SmolLM2 at 20% removed (docs/results.md, bench.quality): 0.01 chose better than 1
DEFAULT_DAMP = (
    1.0  # measured on SmolLM2 at 20% removed (docs/results.md, bench.quality): 1 beat 0.1 and 0.5, and 3 was no better
)


@dataclass(frozen=True)
class PruneSpec:
    """What to remove (budget, layers, granularity, which modules) and how (metric, aggregation, allocation with its
    depth slope and floor, compensation with its damping, one size for every layer)."""

    ratio: float | None = DEFAULT_RATIO
    target_params: float | None = None
    layers: str | None = None  # START:STOP, "all", or None: LLM-Pruner's default range scaled to depth
    granularity: AttnGranularity = "kv"
    prune_attention: bool = True
    prune_mlp: bool = True
    metric: str = DEFAULT_METRIC
    aggregation: str = "sum"
    allocation: str = DEFAULT_ALLOCATION
    depth_slope: float = 0.0  # allocation `depth`: per-layer ratios r·(1 + slope·(2p − 1))
    min_keep: float = DEFAULT_MIN_KEEP  # allocation `global`: the fewest units of a module a layer keeps
    compensation: str = "none"
    damp: float = DEFAULT_DAMP  # lsq: damping toward the trained weights, times the mean input variance
    same_size: bool = False  # every pruned layer keeps one size (a stock-config save, `--stock-config`)
    align: int = 1  # every pruned layer keeps a multiple of this many MLP channels (of each expert in a MoE layer)
    obs_damp: float = DEFAULT_OBS_DAMP  # obs: the damping its selection assumes, times the mean input variance
    sequential: bool = False  # layer by layer, each from the pruned layers' outputs (`adapruner.cutting.sequential`)
    inexact_heads: bool = False  # prune heads whose q/k norms span all heads (`families.check_attention_pruning`)

    def check(self) -> PruneSpec:
        """Every field in range, or a one-line error naming the flag; returns self."""
        if self.target_params is None:
            check_ratio(self.ratio)
        else:
            check_target_params(self.target_params)
        registered(self.metric)
        check_aggregation(self.aggregation)
        check_allocation(self.allocation)
        check_compensation(self.compensation)
        _check_choice(self.granularity, GRANULARITIES, "attention granularity")
        if not (self.prune_attention or self.prune_mlp):
            raise AdaPrunerError("--no-attention with --no-mlp leaves nothing to prune: drop one")
        if not -1.0 < self.depth_slope < 1.0:  # a search's depth trials draw slopes of either sign
            raise AdaPrunerError(f"--depth-slope {self.depth_slope} is outside (-1, 1)")
        if not 0.0 <= self.min_keep < 1.0:
            raise AdaPrunerError(f"--min-keep {self.min_keep} is outside [0, 1)")
        if not (isinstance(self.align, int) and self.align >= 1):
            raise AdaPrunerError(f"--align {self.align}: pass a whole number of channels, at least 1")
        if not self.obs_damp > 0:
            raise AdaPrunerError(f"--obs-damp {self.obs_damp}: the obs metric needs a damping above 0")
        if self.compensation == "lsq" and not self.damp > 0:
            raise AdaPrunerError(f"--damp {self.damp}: lsq compensation needs a damping above 0")
        return self

    @property
    def slope(self) -> float:
        """The depth slope the allocation uses (0 unless the allocation is `depth`)."""
        return self.depth_slope if allocation(self.allocation).sloped else 0.0

    def with_(self, **changes) -> PruneSpec:
        """A copy with `changes` (a trial's choices, a study's plan)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PruneSpec:
        """The spec of `to_dict`; an unknown key is a one-line error, a missing one takes its default (a spec saved
        before the field existed)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not set(data) <= names:
            raise AdaPrunerError(f"a pruning spec holds only the fields {', '.join(sorted(names))}")
        return cls(**data)


def check_ratio(ratio: float | None) -> None:
    if ratio is None or not 0.0 < ratio < 1.0:
        raise AdaPrunerError(
            f"ratio {ratio} is outside (0, 1): pass the fraction of each group to remove, e.g. --ratio 0.25"
        )


def check_target_params(target_params: float) -> None:
    if not 0.0 < target_params < 1.0:
        raise AdaPrunerError(
            f"--target-params {target_params} is outside (0, 1): "
            "pass the fraction of all parameters to remove, e.g. 0.2"
        )


def check_aggregation(aggregation: str) -> None:
    _check_choice(aggregation, AGGREGATIONS, "aggregation")


def check_allocation(name: str) -> None:
    allocation(name)  # an unknown name is a one-line error


def check_compensation(mode: str) -> None:
    _check_choice(mode, COMPENSATIONS, "compensation")


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise AdaPrunerError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
