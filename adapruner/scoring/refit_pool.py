"""The refit pool: input moments of the pruned layers' linears over one fixed, large set of calibration windows.

A search trial picks its units from a few cached windows, but the least-squares refit that follows wants hundreds:
on SmolLM2 at 20% removed, refitting from 256 wiki windows instead of the trial's 32 took the evaluation perplexity
from ~60 to ~54, and scoring fluct/act/obs from the same 256 windows took it to ~52 (docs/results.md, "Beyond the
published methods"). The moments add up over tokens, so one forward pass of the dense model gives them for every trial:
    every prunable linear   T, μ = mean x, mean x²        (act: ‖x_i‖₂ = sqrt(T · mean x_i²); fluct: var x_i)
    every output projection C = XᵀX / T                    (lsq refit; obs: Σ = C − μμᵀ)
and, where the search offers the `loss` allocation, the output projections' output Fisher f over the first
`LOSS_WINDOWS` windows (one forward+backward over those: `collect.collect_output_fisher`, as `prune` computes it).
They are saved beside the activation cache (fp32 safetensors, keyed by model, windows and layers) and reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adapruner.choosing.allocation_rules import allocation
from adapruner.choosing.spec import PruneSpec
from adapruner.data.calibration import calibration_samples
from adapruner.devices import model_device
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import output_projections, prunable_linears
from adapruner.scoring.collect import (
    LOSS_WINDOWS,
    collect_input_moments,
    collect_layer_moments,
    collect_output_fisher,
    moment_stats,
)
from adapruner.scoring.importance import MOMENT_STATS, Importance, InputMoments, LinearStats, needs
from adapruner.staging import staged_file


def scored_by_moments(metric: str) -> bool:
    """Whether `metric` reads input moments alone (act, fluct, obs), so that the refit pool can score it."""
    return bool(needs(metric)) and needs(metric) <= MOMENT_STATS


@dataclass
class RefitPool:
    """The moments of the module docstring over the windows of `calib` (`seq_len` tokens, drawn with `seed`)."""

    calib: str
    seq_len: int
    seed: int
    tokens: int
    moments: dict[str, InputMoments]  # by linear name; output projections carry the Gram
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # output projections' output Fisher, if collected

    def stats(self, metric: str, device: torch.device, fisher: bool = False) -> dict[str, LinearStats]:
        """The `LinearStats` a moment metric reads per channel (act_norm, act_var), on `device`; with `fisher` the
        output projections' output Fisher (`loss`). Σ is not among them: `importance` forms it per module on use."""
        if fisher and not self.fisher:
            raise AdaPrunerError("the refit pool holds no output Fisher: collect it with fisher=True (loss allocation)")
        if not scored_by_moments(metric):
            raise AdaPrunerError(f"metric {metric!r} reads gradients, which the refit pool does not hold")
        stats = moment_stats(self.moments, self.tokens, needs(metric) - {"act_cov"}, device)
        for name, output_fisher in self.fisher.items() if fisher else ():
            stats[name].out_fisher = output_fisher.to(device)
        return stats

    def importance(self, model: nn.Module, spec: PruneSpec, seed: int = 0) -> Importance:
        """`StatisticsSource.importance`: the spec's metric scored from the pool's moments, with the output Fisher its
        allocation reads; an output projection's Σ (obs, the error and loss allocations) is formed from its Gram
        when it is read, on its device, one module at a time — the Grams stay where the pool is."""
        stats = self.stats(spec.metric, model_device(model), allocation(spec.allocation).output_fisher)
        grams = {name: m for name, m in self.moments.items() if m.gram is not None}
        return Importance(spec.metric, spec.aggregation, stats, seed=seed, damp=spec.obs_damp, grams=grams)

    def to(self, device: torch.device | str) -> RefitPool:
        """The pool with its moments and output Fisher on `device` (where the memory plan keeps it)."""
        moments = {name: m.to(device) for name, m in self.moments.items()}
        fisher = {name: f.to(device) for name, f in self.fisher.items()}
        return replace(self, moments=moments, fisher=fisher)

    def input_moments(self, model: nn.Module, linears: Mapping[str, nn.Linear], gram: bool) -> dict[str, InputMoments]:
        """`StatisticsSource.input_moments`: the pool's own (output projections carry their Gram)."""
        return {name: self.moments[name] for name in linears}

    def save(self, path: Path) -> None:
        tensors = {}
        for name, m in self.moments.items():
            tensors[f"{name}/mean"], tensors[f"{name}/square_mean"] = m.mean, m.square_mean
            if m.gram is not None:
                tensors[f"{name}/gram"] = m.gram
        for name, f in self.fisher.items():
            tensors[f"{name}/out_fisher"] = f
        about = {"calib": self.calib, "seq_len": str(self.seq_len), "seed": str(self.seed), "tokens": str(self.tokens)}
        with staged_file(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=about)

    @classmethod
    def load(cls, path: Path) -> RefitPool:
        """Read a saved pool; a damaged file is a one-line error naming the fix."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                about = f.metadata() or {}
            tensors = load_file(str(path))
            names = sorted({key.rsplit("/", 1)[0] for key in tensors})
            moments = {
                n: InputMoments(tensors[f"{n}/mean"], tensors[f"{n}/square_mean"], tensors.get(f"{n}/gram"))
                for n in names
            }
            fisher = {n: tensors[f"{n}/out_fisher"] for n in names if f"{n}/out_fisher" in tensors}
            return cls(about["calib"], int(about["seq_len"]), int(about["seed"]), int(about["tokens"]), moments, fisher)
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise AdaPrunerError(f"refit pool {path} is damaged ({exc}): delete it and run again") from None


def refit_pool_bytes(model: nn.Module, layers: range, fisher: bool = False) -> int:
    """The bytes a pool over `layers` of `model` holds (its shapes suffice: a meta model will do), as
    `collect_refit_pool` makes it: fp32 μ and mean x² of every prunable linear's input, the Gram of every output
    projection's, and with `fisher` their output Fisher."""
    linears, outputs = prunable_linears(model, layers), output_projections(model, layers)
    vectors = sum(2 * linear.in_features for linear in (linears | outputs).values())
    grams = sum(linear.in_features**2 for linear in outputs.values())
    out_fisher = sum(linear.out_features for linear in outputs.values()) if fisher else 0
    return 4 * (vectors + grams + out_fisher)


def refit_key(model_digest: str, calib: str, seq_len: int, seed: int, layers: range, texts: list[str]) -> str:
    """The file name of a pool: a digest of what determines its content (`texts`: the digests of its pools' text)."""
    what = [model_digest, calib, seq_len, seed, layers.start, layers.stop, texts]
    return "refit-" + hashlib.sha256(json.dumps(what).encode()).hexdigest()[:24] + ".safetensors"


def collect_refit_pool(
    model: nn.Module,
    tokenizer,
    windows: tuple[str, int, int],
    layers: range,
    progress: bool = True,
    fisher: bool = False,
    by_layer: bool = False,
) -> RefitPool:
    """The moments of every prunable linear of `layers` over the `windows` = (calib, seq_len, seed), with the Gram of
    their output projections: from whole-model passes (every layer's sums on the device at once), or with `by_layer`
    one decoder layer at a time into host memory (`collect_layer_moments`: one layer's Grams on the device; the
    memory plan asks for it where the pool does not fit there). With `fisher`, the output projections' output Fisher
    over the first `LOSS_WINDOWS` windows too."""
    calib, seq_len, seed = windows
    input_ids = calibration_samples(tokenizer, calib, seq_len, seed).input_ids
    outputs = output_projections(model, layers)
    if by_layer:
        moments = collect_layer_moments(model, input_ids, layers, "cpu", progress)
    else:
        moments = collect_input_moments(
            model, prunable_linears(model, layers) | outputs, input_ids, False, 8, progress, outputs
        )
    fisher_of = collect_output_fisher(model, outputs, input_ids[:LOSS_WINDOWS], progress) if fisher else {}
    return RefitPool(calib, seq_len, seed, input_ids.numel(), moments, fisher_of)


def load_or_collect(
    model: nn.Module,
    tokenizer,
    windows: tuple[str, int, int],
    layers: range,
    path: Path,
    progress: bool = True,
    fisher: bool = False,
    by_layer: bool = False,
) -> RefitPool:
    """The pool of `windows` = (calib, seq_len, seed) saved at `path` when it is the one asked for (with its output
    Fisher where `fisher`); else collected (`by_layer`: one decoder layer at a time) and saved there."""
    if path.is_file():
        pool = RefitPool.load(path)
        if (pool.calib, pool.seq_len, pool.seed) == tuple(windows) and (pool.fisher or not fisher):
            return pool
    pool = collect_refit_pool(model, tokenizer, windows, layers, progress, fisher, by_layer)
    pool.save(path)
    return pool
