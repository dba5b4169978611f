"""One call from a dense model to a pruned one: calibration → statistics → importance → plan → removal."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedTokenizerBase

from adapruner.best_trial import BestTrial
from adapruner.calibration import DEFAULT_SEQ_LEN, calibration_samples, windows_at
from adapruner.compensation import compensation_passes, give_output_biases, install
from adapruner.errors import AdaPrunerError
from adapruner.importance import Importance, LinearStats, check_expert_metrics, needs
from adapruner.plan import PrunePlan
from adapruner.removal import apply_plan
from adapruner.selection import plan_allocation
from adapruner.spec import PruneSpec
from adapruner.statistics import collect_input_moments, collect_stats
from adapruner.structure import decoder_layers, has_experts, output_projections, parse_layer_range, prunable_linears


@dataclass
class PruneOptions:
    """A pruning spec and the calibration data its statistics come from."""

    spec: PruneSpec = field(default_factory=PruneSpec)
    calib: str = "wiki:16"
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    calib_addresses: list[tuple[str, int]] | None = None  # exact (pool, index) windows, e.g. from a search

    @classmethod
    def from_best(cls, best: BestTrial) -> PruneOptions:
        """The recipe of a search's best trial: re-deriving its plan with fp32 statistics on its windows."""
        return cls(spec=best.prune_spec, seq_len=best.seq_len, calib_addresses=[tuple(a) for a in best.addresses])


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
    model: nn.Module, best: BestTrial, tokenizer: PreTrainedTokenizerBase | None = None, progress: bool = True
) -> PruneResult:
    """Prune `model` in place by the plan a search scored (`best.json` of `adapruner search`): no importance
    statistics; a compensated trial's output linears are refit from the input moments of the trial's own windows
    (one forward pass over them, fp32, where the search read the cache)."""
    plan = best.prune_plan
    updates = {}
    spec = best.prune_spec
    if spec.compensation != "none":
        if tokenizer is None:
            raise AdaPrunerError("the study's best trial is compensated: pass the tokenizer to re-read its windows")
        samples = windows_at(tokenizer, [tuple(a) for a in best.addresses], best.seq_len)
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
    """Prune `model` in place as `options` say and return what was done."""
    spec = options.spec.check()
    layers = parse_layer_range(spec.layers, len(decoder_layers(model)))
    check_expert_metrics([spec.metric], spec.prune_mlp, has_experts(model, layers))
    required = needs(spec.metric)
    linears = prunable_linears(model, layers)
    outputs = output_projections(model, layers)
    addresses: list[tuple[str, int]] = []
    stats, moments = {}, {}
    if required or spec.compensation != "none":
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
    importance = Importance(spec.metric, spec.aggregation, stats, seed=options.seed)
    plan = plan_allocation(model, importance, spec)
    updates = {}
    if spec.compensation != "none":
        updates = compensation_passes(model, plan, samples.input_ids, spec.compensation, spec.damp, progress=progress)
    apply_plan(model, plan)
    install(model, updates)
    give_output_biases(model)  # every o_proj/down_proj then has a bias, as the saved model will
    return PruneResult(
        spec.ratio if spec.target_params is None else None, list(layers), plan, addresses, sorted(updates)
    )
