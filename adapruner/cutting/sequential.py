"""Sequential layer-wise pruning: each layer's statistics from the inputs that the already-pruned layers before it
produce (SparseGPT's calibration order), one decoder layer in memory at a time.

The calibration windows run once through the dense model, which records the hidden states entering the first pruned
layer and every pruned layer's keyword arguments (masks, rotary tables). Then, layer by layer:
  1. attention: the layer runs on its inputs while hooks add up the moments of its projections' inputs; its heads are
     chosen from them (the metric's scores, or the greedy OBS order for `obs`), its output projection refit from them
     (`--compensation`), and the cut applied;
  2. MLP: the layer runs again, its attention now pruned; the channels are chosen, refit and cut likewise;
  3. the layer runs a third time: its outputs are the next layer's inputs.
How many units each layer loses comes first, from the spec's allocation (`global`, `error` and `loss` score the dense
model for it); only the choice of units and the refit see the pruned inputs. Memory: the calibration hidden states
(windows × seq_len × hidden) and one layer's statistics. Metrics are those a layer's own inputs give (`obs`, `act`,
`fluct`, the weight metrics); the gradient metrics need the whole model's backward and are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from adapruner.choosing.allocation import Counts
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import choosing_scores, plan_from_counts
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.compensation import refit_updates
from adapruner.cutting.removal import cut
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import attention_group, decoder_layers, layer_info, mlp_group
from adapruner.scoring.collect import LayerRun, input_moment_sums, layer_inputs
from adapruner.scoring.importance import MOMENT_STATS, InputMoments
from adapruner.scoring.metrics import metric as registered
from adapruner.scoring.sources import LayerInputs

Observer = Callable[[str, InputMoments], None]  # told the moments each output projection was chosen and refit from


def check_sequential(spec: PruneSpec) -> None:
    """Sequential pruning reads layer inputs only: a gradient metric is a one-line error."""
    needed = registered(spec.metric).needs - MOMENT_STATS
    if needed:
        raise AdaPrunerError(
            f"--sequential scores each layer from its own inputs; metric {spec.metric!r} needs the whole model's "
            "gradients: use obs, act, fluct or a weight metric"
        )


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    input_ids: torch.Tensor,
    spec: PruneSpec,
    counts: Counts,
    seed: int = 0,
    observe: Observer | None = None,
    progress: bool = True,
) -> tuple[PrunePlan, list[str]]:
    """Prune `model` in place layer by layer (see the module docstring), each layer losing `counts[layer]` units
    (`seed`: the `random` metric's); returns the plan (units of the dense layers) and the output linears given
    compensated weights. `observe` is told the moments each output projection was chosen and refit from."""
    check_sequential(spec)
    layers = sorted(counts)
    hidden, arguments = layer_inputs(model, input_ids, layers)
    plan, refit = PrunePlan(), []
    for index in tqdm(layers, desc="sequential", unit="layer", disable=not progress):
        run = LayerRun(decoder_layers(model)[index], hidden, arguments[index])
        for slot, (module, on) in enumerate((("attn", spec.prune_attention), ("mlp", spec.prune_mlp))):
            if on:
                where = (index, module, counts[index][slot])
                part, updated = _prune_part(model, where, spec, run, seed, observe)
                plan.attention.update(part.attention)
                plan.mlp.update(part.mlp)
                refit += updated
        hidden = run.outputs()
    return plan, refit


def _prune_part(
    model: nn.Module,
    where: tuple[int, str, int],
    spec: PruneSpec,
    run: LayerRun,
    seed: int,
    observe: Observer | None,
) -> tuple[PrunePlan, list[str]]:
    """Choose, refit and cut one layer's attention or MLP (`where`: (layer, "attn" | "mlp", units to remove)) from
    the moments of its inputs as they are now; the part's plan and the output linears refit."""
    index, module, n_remove = where
    info = layer_info(model, index)
    group = attention_group(info, spec.granularity) if module == "attn" else mlp_group(info)
    output = next(m.name for m in group.members if m.dim == 1)
    gram = registered(spec.metric).surgeon or spec.compensation == "lsq"
    with input_moment_sums({m.name: m.linear for m in group.members}, (output,) if gram else ()) as moments:
        run.outputs()
    statistics = LayerInputs(moments, run.tokens)
    which = {index: (module == "attn", module == "mlp")}
    counts = {index: (n_remove, 0) if module == "attn" else (0, n_remove)}
    scores = choosing_scores(model, statistics.importance(model, spec, seed), which, counts, spec.granularity)
    part = plan_from_counts(model, scores, counts, spec.granularity)
    if observe is not None:
        observe(output, moments[output])
    updates = refit_updates(model, part, statistics, spec.compensation, spec.damp)
    cut(model, part, updates)
    return part, sorted(updates)
