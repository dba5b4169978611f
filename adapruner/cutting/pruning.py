"""One call from a dense model to a pruned one: calibration → statistics → importance → plan → removal."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapruner.choosing.allocation import Counts
from adapruner.choosing.allocation_rules import allocation
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import allocate, plan_allocation, scoreless_counts
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.compensation import compensation_passes, compensation_updates, give_output_biases, install
from adapruner.cutting.removal import apply_plan
from adapruner.cutting.sequential import check_sequential, prune_sequential
from adapruner.data.calibration import DEFAULT_SEQ_LEN, calibration_samples, windows_at
from adapruner.devices import model_device
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import (
    decoder_layers,
    has_experts,
    output_projections,
    parse_layer_range,
    prunable_linears,
)
from adapruner.scoring.importance import COLLECTED_STATS, Importance, LinearStats, check_expert_metrics, needs
from adapruner.scoring.refit_pool import RefitPool
from adapruner.scoring.statistics import (
    LOSS_WINDOWS,
    InputMoments,
    collect_input_moments,
    collect_output_fisher,
    collect_stats,
)
from adapruner.searching.best_trial import BestTrial
from adapruner.searching.memory_plan import device_free_bytes


@dataclass
class PruneOptions:
    """A pruning spec and the calibration data its statistics come from."""

    spec: PruneSpec = field(default_factory=PruneSpec)
    calib: str = "wiki:16"
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    calib_addresses: list[tuple[str, int]] | None = None  # exact (pool, index) windows, e.g. from a search
    refit_calib: str | None = None  # the windows compensation refits on (POOL:N, seeded); None: the calibration's

    @classmethod
    def from_best(cls, best: BestTrial) -> PruneOptions:
        """The recipe of a search's best trial: re-deriving its plan with fp32 statistics on its windows (the refit
        pool's, for a trial scored there) and refitting on the refit pool where the search had one."""
        if best.statistics == "refit":
            return cls(spec=best.prune_spec, calib=best.refit_calib, seq_len=best.seq_len, seed=best.seed)
        return cls(
            spec=best.prune_spec,
            seq_len=best.seq_len,
            seed=best.seed,
            calib_addresses=[tuple(a) for a in best.addresses],
            refit_calib=None if best.prune_spec.sequential else best.refit_calib,  # sequential refits on its windows
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
        return {
            "ratio": self.ratio,
            "layers": self.layers,
            "plan": self.plan.to_dict(),
            "calib_addresses": self.calib_addresses,
            "compensated": self.compensated,
        }


def apply_study_plan(
    model: nn.Module,
    best: BestTrial,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    refit_pool: RefitPool | None = None,
) -> PruneResult:
    """Prune `model` in place by the plan a search scored (`best.json` of `adapruner search`): no importance
    statistics; a compensated trial's output linears are refit from the input moments of the trial's own windows
    (one forward pass over them, fp32, where the search read the cache). A sequential study's best recipe is applied
    layer by layer on the trial's windows instead (`prune_model`): its plan then differs from the scored one."""
    if best.prune_spec.sequential:
        if tokenizer is None:
            raise AdaPrunerError("the study is sequential: pass the tokenizer to re-read its best trial's windows")
        return prune_model(model, tokenizer, PruneOptions.from_best(best), progress)
    plan = best.prune_plan
    updates = {}
    spec = best.prune_spec
    saved = refit_pool is not None and (refit_pool.calib, refit_pool.seq_len, refit_pool.seed) == (
        best.refit_calib,
        best.seq_len,
        best.seed,
    )
    if spec.compensation != "none" and saved:
        updates = compensation_updates(model, plan, refit_pool.moments_of, spec.compensation, spec.damp)
    elif spec.compensation != "none":
        if tokenizer is None:
            raise AdaPrunerError("the study's best trial is compensated: pass the tokenizer to re-read its windows")
        samples = (
            calibration_samples(tokenizer, best.refit_calib, best.seq_len, best.seed)
            if best.refit_calib
            else windows_at(tokenizer, [tuple(a) for a in best.addresses], best.seq_len)
        )
        updates = compensation_passes(model, plan, samples.input_ids, spec.compensation, spec.damp, progress=progress)
    apply_plan(model, plan)
    install(model, updates)
    give_output_biases(model)  # every o_proj/down_proj then has a bias, as the saved model will
    layers = parse_layer_range(spec.layers, len(decoder_layers(model)))
    return PruneResult(
        spec.ratio if spec.target_params is None else None,
        list(layers),
        plan,
        [tuple(a) for a in best.addresses],
        sorted(updates),
    )


def prune_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, options: PruneOptions, progress: bool = True
) -> PruneResult:
    """Prune `model` in place as `options` say and return what was done: from the dense model's statistics, or
    layer by layer from the pruned layers' outputs (`spec.sequential`, `adapruner.cutting.sequential`)."""
    spec = options.spec.check()
    layers = parse_layer_range(spec.layers, len(decoder_layers(model)))
    moe = has_experts(model, layers)
    check_expert_metrics([spec.metric], spec.prune_mlp, moe, (spec.allocation,), spec.sequential)
    if spec.sequential:
        check_sequential(spec)
        if options.refit_calib:
            raise AdaPrunerError("--sequential refits each layer on the --calib windows: drop --refit-calib")
    refit = options.refit_calib if spec.compensation != "none" else None
    samples = None
    refit_here = spec.compensation != "none" and not refit
    grams = 4 * sum(linear.in_features**2 for linear in output_projections(model, layers).values())
    refit_on_calib = refit_here and spec.compensation == "lsq" and grams <= device_free_bytes(model_device(model)) // 2
    if needs(spec.metric) or allocation(spec.allocation).refit_error or refit_here or spec.sequential:
        if options.calib_addresses:
            samples = windows_at(tokenizer, options.calib_addresses, options.seq_len)
        else:
            samples = calibration_samples(tokenizer, options.calib, options.seq_len, options.seed)
    addresses = list(samples.addresses) if samples is not None else []
    if spec.sequential:
        counts = scoreless_counts(model, spec, layers) or _scored_counts(model, options, samples.input_ids, progress)
        plan, refitted = prune_sequential(model, samples.input_ids, spec, counts, options.seed, progress=progress)
    else:
        stats, moments = {}, {}
        if samples is not None:
            stats, moments = dense_statistics(model, spec, layers, samples.input_ids, progress, refit_on_calib)
        importance = Importance(spec.metric, spec.aggregation, stats, seed=options.seed, damp=spec.obs_damp)
        if refit:
            samples = calibration_samples(tokenizer, refit, options.seq_len, options.seed)
            moments = {}  # the refit's moments come from its own windows
        plan, refitted = _prune_at_once(model, importance, spec, (samples, moments), progress)
    give_output_biases(model)  # every o_proj/down_proj then has a bias, as the saved model will
    return PruneResult(spec.ratio if spec.target_params is None else None, list(layers), plan, addresses, refitted)


def _prune_at_once(
    model: nn.Module, importance: Importance, spec: PruneSpec, data: tuple, progress: bool
) -> tuple[PrunePlan, list[str]]:
    """Plan from the dense statistics, refit the output linears (from `data` = (calibration samples, the output
    projections' moments)), cut; the plan and the linears refit."""
    samples, moments = data
    plan = plan_allocation(model, importance, spec)
    updates = {}
    covariances = {name: stats.act_cov for name, stats in importance.stats.items() if stats.act_cov is not None}
    if spec.compensation != "none" and covariances and moments:  # Σ at hand: no second pass; C = Σ + μμᵀ one at a time

        def moments_of(name: str) -> InputMoments:
            mean = moments[name].mean
            return replace(moments[name], gram=covariances[name] + torch.outer(mean, mean))

        updates = compensation_updates(model, plan, moments_of, spec.compensation, spec.damp)
    elif spec.compensation != "none":
        updates = compensation_passes(model, plan, samples.input_ids, spec.compensation, spec.damp, progress=progress)
    apply_plan(model, plan)
    install(model, updates)
    return plan, sorted(updates)


def dense_statistics(
    model: nn.Module,
    spec: PruneSpec,
    layers: range,
    input_ids: torch.Tensor,
    progress: bool,
    covariance: bool = False,
) -> tuple[dict[str, LinearStats], dict[str, InputMoments]]:
    """The `LinearStats` the spec's metric needs of every prunable linear of `layers`, and the input moments of the
    output projections it prunes; `obs`, the `error`/`loss` allocations and `covariance` (an lsq refit on these
    windows) also get their inputs' covariance Σ (kept once, in the stats: the moments hold no Gram), the `loss`
    allocation their output Fisher (over the first `LOSS_WINDOWS` windows), from passes over `input_ids`."""
    required = needs(spec.metric)
    gram = "act_cov" in required or allocation(spec.allocation).refit_error or covariance
    stats, moments = {}, {}
    if required & COLLECTED_STATS:
        stats = collect_stats(model, prunable_linears(model, layers), input_ids, required & COLLECTED_STATS, progress)
    outputs = output_projections(model, layers, spec.prune_attention, spec.prune_mlp)
    if "act_var" in required or gram:
        moments = collect_input_moments(model, outputs, input_ids, gram, progress=progress)
    for name, moment in moments.items():
        stats.setdefault(name, LinearStats()).act_var = moment.variance
        if gram:
            stats[name].act_cov = moment.covariance
            moments[name] = replace(moment, gram=None)
    if allocation(spec.allocation).output_fisher:
        for name, fisher in collect_output_fisher(model, outputs, input_ids[:LOSS_WINDOWS], progress).items():
            stats[name].out_fisher = fisher
    return stats, moments


def _scored_counts(model: nn.Module, options: PruneOptions, input_ids: torch.Tensor, progress: bool) -> Counts:
    """The counts of a scored allocation (global, error, loss) from the dense model's statistics, which go with the
    call."""
    spec = options.spec
    layers = parse_layer_range(spec.layers, len(decoder_layers(model)))
    stats, _moments = dense_statistics(model, spec, layers, input_ids, progress)
    importance = Importance(spec.metric, spec.aggregation, stats, seed=options.seed, damp=spec.obs_damp)
    return allocate(model, importance, spec)[0]
