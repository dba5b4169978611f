"""One call from a dense model to a pruned one: calibration → statistics → importance → plan → removal."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapruner.best_trial import BestTrial
from adapruner.calibration import DEFAULT_SEQ_LEN, calibration_samples, windows_at
from adapruner.allocation import DEFAULT_MIN_KEEP, check_allocation
from adapruner.compensation import DEFAULT_DAMP, check_compensation, compensation_updates, install, output_linears
from adapruner.devices import model_device
from adapruner.errors import AdaPrunerError
from adapruner.io import give_output_biases
from adapruner.memory_plan import device_free_bytes
from adapruner.importance import Importance, LinearStats, check_aggregation, needs
from adapruner.prune import DEFAULT_RATIO, PrunePlan, apply_plan, check_ratio, plan_allocation
from adapruner.statistics import collect_input_moments, collect_stats
from adapruner.structure import AttnGranularity, decoder_layers, parse_layer_range, prunable_linears, output_projections


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
    depth_slope: float = 0.0  # allocation `depth`: per-layer ratios r·(1 + slope·(2p − 1)), see adapruner.allocation
    allocation: str = "uniform"
    min_keep: float = DEFAULT_MIN_KEEP  # allocation `global`: the fewest units of a module a layer keeps (fraction)
    compensation: str = "none"
    damp: float = DEFAULT_DAMP  # lsq compensation's damping toward the trained weights
    same_size: bool = False  # every pruned layer keeps one size (a stock-config save, `--uniform`)

    @classmethod
    def from_best(cls, best: BestTrial) -> "PruneOptions":
        """The recipe of a search's best trial: re-deriving its plan with fp32 statistics on its windows."""
        return cls(
            ratio=best.ratio, metric=best.metric, aggregation=best.aggregation, seq_len=best.seq_len,
            layers=best.layers, granularity=best.granularity, prune_attention=best.prune_attention,
            prune_mlp=best.prune_mlp, calib_addresses=[tuple(a) for a in best.addresses],
            depth_slope=best.slope, allocation=best.allocation, min_keep=best.min_keep, compensation=best.compensation, damp=best.damp,
            target_params=best.target_params,
        )


@dataclass
class PruneResult:
    """The applied plan, the ratio it used and the calibration windows' addresses."""

    ratio: float | None  # None under a parameter budget
    layers: list[int]
    plan: PrunePlan
    calib_addresses: list[tuple[str, int]] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)  # output linears given compensated weights and a bias

    def summary(self) -> dict:
        return {"ratio": self.ratio, "layers": self.layers, "plan": self.plan.to_dict(), "calib_addresses": self.calib_addresses,
                "compensated": self.compensated}


def apply_study_plan(model: nn.Module, best: BestTrial, tokenizer: PreTrainedTokenizerBase | None = None, progress: bool = True) -> PruneResult:
    """Prune `model` in place by the plan a search scored (`best.json` of `adapruner search`): no importance
    statistics; a compensated trial's output linears are refit from the input moments of the trial's own windows
    (one forward pass over them, fp32, where the search read the cache)."""
    plan = best.prune_plan
    updates = {}
    if best.compensation != "none":
        if tokenizer is None:
            raise AdaPrunerError("the study's best trial is compensated: pass the tokenizer to re-read its windows")
        samples = windows_at(tokenizer, [tuple(a) for a in best.addresses], best.seq_len)
        updates = compensation_passes(model, plan, samples.input_ids, best.compensation, best.damp, progress=progress)
    apply_plan(model, plan)
    install(model, updates)
    give_output_biases(model)  # every o_proj/down_proj then has a bias, as the saved model will
    layers = parse_layer_range(best.layers, len(decoder_layers(model)))
    return PruneResult(best.ratio, list(layers), plan, [tuple(a) for a in best.addresses], sorted(updates))


def output_inputs(model: nn.Module, plan: PrunePlan) -> dict[str, nn.Linear]:
    """The output linears (o_proj, down_proj) a plan narrows, by name: the ones compensation refits."""
    return {name: linear for name, (linear, _kept) in output_linears(model, plan).items()}


def compensation_passes(model: nn.Module, plan: PrunePlan, input_ids: torch.Tensor, mode: str, damp: float,
                        gram_bytes: int | None = None, progress: bool = True) -> dict:
    """The compensated output linears of `plan` from forward passes of the dense `model` over `input_ids`. lsq needs
    each linear's Gram XᵀX/T (in² fp32): a pass collects as many as fit `gram_bytes` (default: half the memory free
    where the model's inputs go), solves them and frees them before the next pass — a 70B model's 80 down_proj Grams
    (3.3 GB each) never sit in memory together. bias needs one pass."""
    check_compensation(mode)
    targets = output_inputs(model, plan)
    if mode == "none" or not targets:
        return {}
    budget = gram_bytes if gram_bytes is not None else device_free_bytes(model_device(model)) // 2
    updates = {}
    for chunk in gram_chunks(targets, budget if mode == "lsq" else None):
        moments = collect_input_moments(model, chunk, input_ids, mode == "lsq", progress=progress)
        updates |= compensation_updates(model, plan, moments.__getitem__, mode, damp, names=chunk)
    return updates


def gram_chunks(linears: dict[str, nn.Linear], budget_bytes: int | None) -> list[dict[str, nn.Linear]]:
    """`linears` in order, cut into runs whose fp32 Grams (in_features² · 4 bytes each) fit `budget_bytes` together
    (None: one run; a linear whose Gram alone is larger gets a run of its own)."""
    chunks: list[dict[str, nn.Linear]] = [{}]
    used = 0
    for name, linear in linears.items():
        size = 4 * linear.in_features**2
        if budget_bytes is not None and chunks[-1] and used + size > budget_bytes:
            chunks.append({})
            used = 0
        chunks[-1][name] = linear
        used += size
    return chunks


def prune_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, options: PruneOptions, progress: bool = True) -> PruneResult:
    """Prune `model` in place as `options` say and return what was done."""
    layers = parse_layer_range(options.layers, len(decoder_layers(model)))
    check_aggregation(options.aggregation)
    check_allocation(options.allocation)
    check_compensation(options.compensation)
    required = needs(options.metric)
    if options.target_params is None:
        check_ratio(options.ratio)
    linears = prunable_linears(model, layers)
    outputs = output_projections(model, layers)
    addresses: list[tuple[str, int]] = []
    stats, moments = {}, {}
    if required or options.compensation != "none":
        if options.calib_addresses:
            samples = windows_at(tokenizer, options.calib_addresses, options.seq_len)
        else:
            samples = calibration_samples(tokenizer, options.calib, options.seq_len, options.seed)
        addresses = list(samples.addresses)
        if required - {"act_var"}:
            stats = collect_stats(model, linears, samples.input_ids, required - {"act_var"}, progress)
        if "act_var" in required:
            moments = collect_input_moments(model, outputs, samples.input_ids, progress=progress)
    for name, moment in moments.items():
        stats.setdefault(name, LinearStats()).act_var = moment.variance
    importance = Importance(options.metric, options.aggregation, stats, seed=options.seed)
    plan = plan_allocation(model, importance, layers, options.granularity, options.prune_attention, options.prune_mlp, options.allocation,
                           options.ratio, options.target_params, options.depth_slope, options.min_keep, options.same_size)
    updates = compensation_passes(model, plan, samples.input_ids, options.compensation, options.damp, progress=progress) if options.compensation != "none" else {}
    apply_plan(model, plan)
    install(model, updates)
    give_output_biases(model)  # every o_proj/down_proj then has a bias, as the saved model will
    return PruneResult(options.ratio if options.target_params is None else None, list(layers), plan, addresses, sorted(updates))
