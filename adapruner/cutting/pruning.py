"""One call from a dense model to a pruned one: calibration → statistics → importance → plan → removal."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedTokenizerBase

from adapruner.choosing.allocation_rules import allocation
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import allocate, plan_allocation, scoreless_counts
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.compensation import give_output_biases, refit_updates
from adapruner.cutting.removal import cut
from adapruner.cutting.sequential import check_sequential, prune_sequential
from adapruner.data.calibration import DEFAULT_SEQ_LEN, calibration_samples, windows_at
from adapruner.devices import model_device
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import decoder_layers, has_experts, output_projections, parse_layer_range
from adapruner.scoring.importance import check_expert_metrics, needs
from adapruner.scoring.refit_pool import RefitPool
from adapruner.scoring.sources import CalibrationPasses, StatisticsSource
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
    statistics; a compensated trial's output linears are refit from the refit pool it was scored with (`refit_pool`,
    where it is the one the search saved), else from one forward pass (fp32) over that pool's windows — or, for a
    search without one, over the trial's own windows. A sequential study's best recipe is applied layer by layer on
    the trial's windows instead (`prune_model`): its plan then differs from the scored one."""
    if best.prune_spec.sequential:
        if tokenizer is None:
            raise AdaPrunerError("the study is sequential: pass the tokenizer to re-read its best trial's windows")
        return prune_model(model, tokenizer, PruneOptions.from_best(best), progress)
    plan, spec = best.prune_plan, best.prune_spec
    saved = refit_pool is not None and (refit_pool.calib, refit_pool.seq_len, refit_pool.seed) == (
        best.refit_calib,
        best.seq_len,
        best.seed,
    )
    statistics: StatisticsSource | None = refit_pool if saved else None
    if spec.compensation != "none" and statistics is None:
        if tokenizer is None:
            raise AdaPrunerError("the study's best trial is compensated: pass the tokenizer to re-read its windows")
        samples = (
            calibration_samples(tokenizer, best.refit_calib, best.seq_len, best.seed)
            if best.refit_calib
            else windows_at(tokenizer, [tuple(a) for a in best.addresses], best.seq_len)
        )
        statistics = CalibrationPasses(samples.input_ids, progress)
    updates = {} if statistics is None else refit_updates(model, plan, statistics, spec.compensation, spec.damp)
    cut(model, plan, updates)
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
    """Prune `model` in place as `options` say and return what was done: needs → statistics (passes of the dense
    model over the calibration windows) → plan → refit (on the --refit-calib windows, else the calibration's) → cut;
    or layer by layer from the pruned layers' outputs (`spec.sequential`, `adapruner.cutting.sequential`)."""
    spec = options.spec.check()
    layers = parse_layer_range(spec.layers, len(decoder_layers(model)))
    moe = has_experts(model, layers)
    check_expert_metrics([spec.metric], spec.prune_mlp, moe, (spec.allocation,), spec.sequential)
    if spec.sequential:
        check_sequential(spec)
        if options.refit_calib:
            raise AdaPrunerError("--sequential refits each layer on the --calib windows: drop --refit-calib")
    refit_here = spec.compensation != "none" and not options.refit_calib
    samples = None
    if needs(spec.metric) or allocation(spec.allocation).refit_error or refit_here or spec.sequential:
        if options.calib_addresses:
            samples = windows_at(tokenizer, options.calib_addresses, options.seq_len)
        else:
            samples = calibration_samples(tokenizer, options.calib, options.seq_len, options.seed)
    statistics = CalibrationPasses(
        None if samples is None else samples.input_ids, progress, _grams_fit(model, spec, layers)
    )
    if spec.sequential:
        counts = scoreless_counts(model, spec, layers) or allocate(model, statistics.importance(model, spec), spec)[0]
        plan, refitted = prune_sequential(model, samples.input_ids, spec, counts, options.seed, progress=progress)
    else:
        plan = plan_allocation(model, statistics.importance(model, spec, options.seed), spec)
        if options.refit_calib and spec.compensation != "none":
            refit_windows = calibration_samples(tokenizer, options.refit_calib, options.seq_len, options.seed)
            statistics = CalibrationPasses(refit_windows.input_ids, progress)
        updates = refit_updates(model, plan, statistics, spec.compensation, spec.damp)
        del statistics  # its Grams are not needed by the cut, whose gather holds every new weight at once
        cut(model, plan, updates)
        refitted = sorted(updates)
    give_output_biases(model)  # every o_proj/down_proj then has a bias, as the saved model will
    addresses = list(samples.addresses) if samples is not None else []
    return PruneResult(spec.ratio if spec.target_params is None else None, list(layers), plan, addresses, refitted)


def _grams_fit(model: nn.Module, spec: PruneSpec, layers: range) -> bool:
    """Whether an lsq refit on the calibration windows keeps the Grams of `layers`' output projections from the
    statistics pass: all of them (fp32) fit in half the memory free where the model's inputs go."""
    if spec.compensation != "lsq":
        return False
    grams = 4 * sum(linear.in_features**2 for linear in output_projections(model, layers).values())
    return grams <= device_free_bytes(model_device(model)) // 2
