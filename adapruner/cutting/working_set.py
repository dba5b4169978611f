"""What `prune` holds beside the model's weights, from the model's shapes alone (`prune --memory-plan`).

`prune` (not `--sequential`, whose layer-by-layer passes are not modelled) runs in phases, each freeing what it made
before the next (`prune_model`): load → statistics (forward passes over the calibration windows; a forward+backward
for gradient metrics and the `loss` allocation's output Fisher) → allocation (the `error`/`loss` curves, one output
projection at a time) → refit (the Grams of the refit windows, then one solve per output projection) → cut → save
(safetensors writes each tensor from where it is). Its peak is the weights plus the largest phase (`peak_bytes`).
Each phase's bytes, for weights of `e` bytes, batches of B windows of S tokens (T = B·S), hidden h, MLP width m,
query width q, kv width k, query heads H and vocabulary V:
  load        the weights file mapped while the parameters are filled (its pages count as resident);
  statistics  fp32 input moments 8·in of every output projection (+ its Gram 4·in² for `obs`, `error`/`loss` and
              an lsq refit on these windows), fp32 gradient statistics 4·out·in per prunable linear for each of grad
              and fisher the metric reads, and one batch's activations: a forward holds one layer's
              T·(2h + q + 2k + 3m)·e and the fp32 logits twice, 8·T·V; a gradient metric's backward holds every
              layer's saved tensors T·(4h + 3q + 3k + 5m + 2·H·S)·e (norms' inputs and outputs, q/k/v before and
              after the rotation, the attention's output and probabilities, the MLP's four products) and the logits
              three times, 12·T·V; the `loss` allocation's output Fisher goes down one layer at a time
              (`collect.layer_gradients`): every layer's input T·h·e, one layer's saved tensors and the logits;
  allocation  the statistics still held and the error curves of the largest output projection (H, its Cholesky,
              out × in products; priced in fp64, what `obs`'s rank updates use — a fixed order runs in fp32);
  refit       the Grams of every output projection 4·in² (+ moments), and the refit weights, at most 4·out·in each;
  cut         the refit weights and every cut linear's kept rows and columns, gathered at once (≈ the prunable
              linears' bytes less the removed parameters'; the statistics are released first; a save writes the
              tensors where they are).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adapruner.choosing.allocation import target_count
from adapruner.choosing.allocation_rules import allocation
from adapruner.cutting.pruning import PruneOptions
from adapruner.model.structure import (
    decoder_layers,
    layer_info,
    output_projections,
    parse_layer_range,
    prunable_linears,
)
from adapruner.output.report import format_table
from adapruner.scoring.importance import needs
from adapruner.searching.memory_plan import GIB

PASS_KINDS = {None: "forward", "whole": "forward+backward", "layered": "forward+backward, one layer at a time"}
CALIBRATION_BATCH = 8  # windows per pass (`collect_stats`, `collect_input_moments`, `collect_output_fisher`)


@dataclass(frozen=True)
class Phase:
    """One phase of `prune` and the bytes it holds beside the weights."""

    name: str
    bytes: int
    what: str


@dataclass(frozen=True)
class PruneMemoryPlan:
    """The weights' bytes and every phase's working set, for the model and device given."""

    device: str
    model_bytes: int
    phases: tuple[Phase, ...]

    @property
    def peak_bytes(self) -> int:
        """The weights plus the largest phase: phases do not overlap."""
        return self.model_bytes + max(phase.bytes for phase in self.phases)

    def table(self) -> str:
        rows = [["model weights", f"{self.model_bytes / GIB:.3f} GiB", f"on {self.device}"]]
        rows += [[phase.name, f"{phase.bytes / GIB:.3f} GiB", phase.what] for phase in self.phases]
        rows.append(["peak", f"{self.peak_bytes / GIB:.3f} GiB", "the weights + the largest phase"])
        return format_table(["prune memory plan", "size", "what"], rows)


def prune_memory_plan(
    model: nn.Module, options: PruneOptions, device: str, file_bytes: int | None = None
) -> PruneMemoryPlan:
    """The plan of `prune_model(model, …, options)` for `model`'s shapes (a meta model will do) on `device`; the
    weights file is `file_bytes` long (None: as long as the weights)."""
    spec = options.spec
    layers = parse_layer_range(spec.layers, len(decoder_layers(model)))
    linears = prunable_linears(model, layers)
    outputs = output_projections(model, layers, spec.prune_attention, spec.prune_mlp)
    required, rule = needs(spec.metric), allocation(spec.allocation)
    element = next(model.parameters()).element_size()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 8 * sum(linear.in_features for linear in outputs.values())
    grams = 4 * sum(linear.in_features**2 for linear in outputs.values())
    gradients = len({"grad", "fisher"} & required) * 4 * weight_count(linears)
    backward = "whole" if {"grad", "fisher"} & required else "layered" if rule.output_fisher else None
    refit_apart = options.refit_calib is not None and spec.compensation != "none"  # its own windows, its own pass
    gram_in_statistics = "act_cov" in required or rule.refit_error or (spec.compensation == "lsq" and not refit_apart)
    passes = activation_bytes(model, CALIBRATION_BATCH, options.seq_len, element, backward)
    phases = [
        Phase("load", file_bytes or model_bytes, "the weights file, mapped while the parameters are filled"),
        Phase(
            "statistics",
            moments + (grams if gram_in_statistics else 0) + gradients + passes,
            f"input moments{' and Grams' if gram_in_statistics else ''}{', gradient statistics' if gradients else ''}"
            f", one batch's activations ({PASS_KINDS[backward]})",
        ),
    ]
    if rule.refit_error:
        largest = max(outputs.values(), key=lambda lin: lin.in_features * (lin.in_features + lin.out_features))
        n, out = largest.in_features, largest.out_features
        curves = 8 * (2 * n * n + out * n)
        phases.append(Phase("allocation", grams + gradients + curves, "the statistics and one module's fp64 curves"))
    if spec.compensation != "none":
        refit = 4 * weight_count(outputs)
        pass_bytes = activation_bytes(model, CALIBRATION_BATCH, options.seq_len, element, None) if refit_apart else 0
        phases.append(
            Phase("refit", moments + grams + refit + pass_bytes, "the Grams and the refit weights (fp32, at most)")
        )
    removed = target_count(model, spec.target_params) if spec.target_params is not None else 0
    kept = (weight_count(linears) - removed) * element if removed else weight_count(linears) * element
    refit = 4 * weight_count(outputs) if spec.compensation != "none" else 0
    phases.append(Phase("cut", refit + kept, "the refit weights and the cut linears' new weights, gathered at once"))
    return PruneMemoryPlan(device, model_bytes, tuple(phases))


def weight_count(linears: dict[str, nn.Linear]) -> int:
    """Σ out·in over `linears`."""
    return sum(linear.out_features * linear.in_features for linear in linears.values())


def activation_bytes(model: nn.Module, windows: int, seq_len: int, element: int, backward: str | None) -> int:
    """What one pass over `windows` windows of `seq_len` tokens holds at its peak (the module docstring's forms):
    a forward (`backward` None), or a forward+backward through every layer at once ("whole") or one layer at a time
    ("layered")."""
    info = layer_info(model, 0)
    hidden, heads = model.config.get_text_config().hidden_size, info.n_heads
    query, kv, width = heads * info.head_dim, info.n_kv_heads * info.head_dim, info.intermediate
    tokens, vocab = windows * seq_len, model.get_output_embeddings().out_features
    per_layer = tokens * (4 * hidden + 3 * query + 3 * kv + 5 * width + 2 * heads * seq_len) * element
    if backward == "whole":
        return len(decoder_layers(model)) * per_layer + 12 * tokens * vocab
    if backward == "layered":
        return len(decoder_layers(model)) * tokens * hidden * element + per_layer + 12 * tokens * vocab
    return tokens * (2 * hidden + query + 2 * kv + 3 * width) * element + 8 * tokens * vocab
