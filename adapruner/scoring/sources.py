"""Where a plan's statistics come from: one protocol, one implementation per origin.

A source answers the two questions every pruning path asks:
    importance(model, spec, seed)      → `Importance`: what the spec's metric and allocation read, of its layers
    input_moments(model, linears, gram) → {name: InputMoments}: μ, mean x² (and C = XᵀX/T with `gram`) of the
                                          named linears' inputs, the output projections a refit solves for

| origin                                   | source              | read by                                   |
|------------------------------------------|---------------------|-------------------------------------------|
| passes of the dense model over windows   | `CalibrationPasses` | `prune_model`, `apply_study_plan`         |
| a sample subset of the activation cache  | `CacheSubset`       | a search trial                            |
| the refit pool                           | `RefitPool`         | a trial scored or refit on the pool       |
| one decoder layer's own inputs           | `LayerInputs`       | sequential pruning, part by part          |

so that each path reads needs → statistics → plan → refit → cut (`compensation.refit_updates`, `removal.cut`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import nn

from adapruner.choosing.allocation_rules import allocation
from adapruner.choosing.spec import PruneSpec
from adapruner.devices import model_device
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import decoder_layers, output_projections, parse_layer_range, prunable_linears
from adapruner.scoring.cache import ActivationCache, CachedImportance
from adapruner.scoring.collect import (
    LOSS_WINDOWS,
    InputMoments,
    collect_input_moments,
    collect_output_fisher,
    collect_stats,
    moment_stats,
)
from adapruner.scoring.importance import COLLECTED_STATS, Importance, LinearStats, needs


class StatisticsSource(Protocol):
    """What a plan and its refit read (module docstring)."""

    def importance(self, model: nn.Module, spec: PruneSpec, seed: int = 0) -> Importance: ...

    def input_moments(
        self, model: nn.Module, linears: Mapping[str, nn.Linear], gram: bool
    ) -> Mapping[str, InputMoments]: ...


@dataclass
class CalibrationPasses:
    """Passes of the dense model over `input_ids` (None: no windows, for a weight metric without a refit). An
    `importance` call keeps the output projections' moments it collected, and with `keep_gram` (an lsq refit on these
    windows whose Grams fit in memory) their covariance: a refit then reads them without another pass."""

    input_ids: torch.Tensor | None
    progress: bool = True
    keep_gram: bool = False
    _moments: dict[str, InputMoments] = field(default_factory=dict, init=False, repr=False)
    _covariances: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def importance(self, model: nn.Module, spec: PruneSpec, seed: int = 0) -> Importance:
        stats = {}
        if self.input_ids is not None:
            layers = parse_layer_range(spec.layers, len(decoder_layers(model)))
            stats = self._dense_statistics(model, spec, layers)
        return Importance(spec.metric, spec.aggregation, stats, seed=seed, damp=spec.obs_damp)

    def _dense_statistics(self, model: nn.Module, spec: PruneSpec, layers: range) -> dict[str, LinearStats]:
        """The `LinearStats` the spec's metric needs of every prunable linear of `layers`; the output projections
        it prunes also get their inputs' variance where the metric reads it, their covariance Σ for `obs`, the
        `error`/`loss` allocations and `keep_gram`, and their output Fisher for `loss` (over the first
        `LOSS_WINDOWS` windows)."""
        required, rule = needs(spec.metric), allocation(spec.allocation)
        gram = "act_cov" in required or rule.refit_error or self.keep_gram
        stats: dict[str, LinearStats] = {}
        if required & COLLECTED_STATS:
            linears = prunable_linears(model, layers)
            stats = collect_stats(model, linears, self.input_ids, required & COLLECTED_STATS, self.progress)
        outputs = output_projections(model, layers, spec.prune_attention, spec.prune_mlp)
        if "act_var" in required or gram:
            self._moments = collect_input_moments(model, outputs, self.input_ids, gram, progress=self.progress)
        fields = {"act_var", "act_cov"} if gram else {"act_var"}
        for name, entry in moment_stats(self._moments, self.input_ids.numel(), fields).items():
            held = stats.setdefault(name, LinearStats())
            held.act_var, held.act_cov = entry.act_var, entry.act_cov
            if gram:  # Σ is kept once, in the stats; the moments keep μ and mean x²
                self._covariances[name] = entry.act_cov
                self._moments[name] = replace(self._moments[name], gram=None)
        if rule.output_fisher:
            windows = self.input_ids[:LOSS_WINDOWS]
            for name, fisher in collect_output_fisher(model, outputs, windows, self.progress).items():
                stats[name].out_fisher = fisher
        return stats

    def input_moments(
        self, model: nn.Module, linears: Mapping[str, nn.Linear], gram: bool
    ) -> Mapping[str, InputMoments]:
        """The moments kept from `importance` where they hold all that is asked (C = Σ + μμᵀ formed one at a time);
        else one forward pass over the windows."""
        if self.input_ids is None:
            raise AdaPrunerError("a refit needs calibration windows: pass --calib")
        held = set(self._covariances if gram else self._moments)
        if held and set(linears) <= held:
            return _WithGram(self._moments, self._covariances) if gram else self._moments
        return collect_input_moments(model, linears, self.input_ids, gram, progress=self.progress)


class _WithGram(Mapping):
    """Moments whose Gram C = Σ + μμᵀ is formed when one is read (a 70B model's would not fit together)."""

    def __init__(self, moments: Mapping[str, InputMoments], covariances: Mapping[str, torch.Tensor]):
        self.moments, self.covariances = moments, covariances

    def __getitem__(self, name: str) -> InputMoments:
        mean = self.moments[name].mean
        return replace(self.moments[name], gram=self.covariances[name] + torch.outer(mean, mean))

    def __iter__(self):
        return iter(self.covariances)

    def __len__(self) -> int:
        return len(self.covariances)


@dataclass
class CacheSubset:
    """The rows of the activation cache's samples `samples` (a search trial's subset)."""

    cache: ActivationCache
    samples: torch.Tensor

    def importance(self, model: nn.Module, spec: PruneSpec, seed: int = 0) -> Importance:
        return CachedImportance(self.cache, spec.metric, spec.aggregation, self.samples, seed, spec.obs_damp)

    def input_moments(
        self, model: nn.Module, linears: Mapping[str, nn.Linear], gram: bool
    ) -> Mapping[str, InputMoments]:
        device = model_device(model)
        return {name: self.cache.input_moments(name, self.samples, device, gram=gram) for name in linears}


@dataclass
class LayerInputs:
    """The moments of one decoder layer's linears over `tokens` tokens of its own (pruned) inputs."""

    moments: Mapping[str, InputMoments]
    tokens: int

    def importance(self, model: nn.Module, spec: PruneSpec, seed: int = 0) -> Importance:
        return Importance(spec.metric, spec.aggregation, moment_stats(self.moments, self.tokens), seed, spec.obs_damp)

    def input_moments(
        self, model: nn.Module, linears: Mapping[str, nn.Linear], gram: bool
    ) -> Mapping[str, InputMoments]:
        return {name: self.moments[name] for name in linears}
