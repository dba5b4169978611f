"""One call from a dense model to a pruned one: calibration → statistics → importance → plan → removal."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedTokenizerBase

from adapruner.best_trial import BestTrial
from adapruner.calibration import DEFAULT_SEQ_LEN, calibration_samples, windows_at
from adapruner.importance import Importance, check_aggregation, needs
from adapruner.prune import DEFAULT_RATIO, PrunePlan, apply_plan, check_ratio, depth_profile, plan_pruning, solve_ratio
from adapruner.statistics import collect_stats
from adapruner.structure import AttnGranularity, decoder_layers, parse_layer_range, prunable_linears


@dataclass
class PruneOptions:
    """What to prune and how. Exactly one of `ratio` and `target_params` is set."""

    ratio: float | None = DEFAULT_RATIO
    target_params: float | None = None
    metric: str = "taylor1"
    aggregation: str = "sum"
    calib: str = "wiki:16"
    seq_len: int = DEFAULT_SEQ_LEN
    layers: str | None = None
    granularity: AttnGranularity = "kv"
    prune_attention: bool = True
    prune_mlp: bool = True
    seed: int = 0
    calib_addresses: list[tuple[str, int]] | None = None  # exact (pool, index) windows, e.g. from a search
    depth_slope: float = 0.0  # per-layer ratios r·(1 + slope·(2p − 1)), see prune.depth_profile

    @classmethod
    def from_best(cls, best: BestTrial) -> "PruneOptions":
        """The recipe of a search's best trial: re-deriving its plan with fp32 statistics on its windows."""
        return cls(
            ratio=best.ratio, metric=best.metric, aggregation=best.aggregation, seq_len=best.seq_len,
            layers=best.layers, granularity=best.granularity, prune_attention=best.prune_attention,
            prune_mlp=best.prune_mlp, calib_addresses=[tuple(a) for a in best.addresses],
            depth_slope=best.slope,
        )


@dataclass
class PruneResult:
    """The applied plan, the ratio it used and the calibration windows' addresses."""

    ratio: float
    layers: list[int]
    plan: PrunePlan
    calib_addresses: list[tuple[str, int]] = field(default_factory=list)

    def summary(self) -> dict:
        return {"ratio": self.ratio, "layers": self.layers, "plan": self.plan.to_dict(), "calib_addresses": self.calib_addresses}


def apply_study_plan(model: nn.Module, best: BestTrial) -> PruneResult:
    """Prune `model` in place by the plan a search scored (`best.json` of `adapruner search`): no statistics."""
    plan = best.prune_plan
    apply_plan(model, plan)
    layers = parse_layer_range(best.layers, len(decoder_layers(model)))
    return PruneResult(best.ratio, list(layers), plan, [tuple(a) for a in best.addresses])


def prune_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, options: PruneOptions, progress: bool = True) -> PruneResult:
    """Prune `model` in place as `options` say and return what was done."""
    layers = parse_layer_range(options.layers, len(decoder_layers(model)))
    check_aggregation(options.aggregation)
    required = needs(options.metric)
    if options.target_params is not None:
        ratio = solve_ratio(model, options.target_params, layers, options.granularity, options.prune_attention, options.prune_mlp)
    else:
        check_ratio(options.ratio)
        ratio = options.ratio
    linears = prunable_linears(model, layers)
    addresses: list[tuple[str, int]] = []
    stats = {}
    if required:
        if options.calib_addresses:
            samples = windows_at(tokenizer, options.calib_addresses, options.seq_len)
        else:
            samples = calibration_samples(tokenizer, options.calib, options.seq_len, options.seed)
        addresses = list(samples.addresses)
        stats = collect_stats(model, linears, samples.input_ids, required, progress)
    importance = Importance(options.metric, options.aggregation, stats, seed=options.seed)
    per_layer = depth_profile(ratio, layers, options.depth_slope) if options.depth_slope else ratio
    plan = plan_pruning(model, importance, per_layer, layers, options.granularity, options.prune_attention, options.prune_mlp)
    apply_plan(model, plan)
    return PruneResult(ratio, list(layers), plan, addresses)
