"""adapruner's importance metrics as a Torch-Pruning importance (`pip install 'adapruner[torch-pruning]'`).

    imp = AdaPrunerImportance("taylor2", group_reduction="sum", normalizer=None)
    imp.calibrate(model, input_ids)          # metrics that need data: per-linear statistics from calibration windows
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.2, ...)

Torch-Pruning hands `__call__` a dependency group: (dependency, indices) pairs whose layer is pruned along its
outputs (rows of a Linear's weight) or inputs (columns). Each Linear member is scored by `channel_importance` — the
function adapruner's own groups use (docs/metrics.md), on the CUDA kernels where the weights live on a GPU — at the
member's indices; the members' scores are combined by Torch-Pruning's `group_reduction` over the root indices and
scaled by its `normalizer`, exactly as its built-in `GroupMagnitudeImportance` does. Non-Linear members (norms,
embeddings) are skipped: adapruner scores linears. `fluct` reads input columns only (o_proj, down_proj), as in
adapruner; `random` is not offered (Torch-Pruning has `RandomImportance`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from adapruner.errors import AdaPrunerError
from adapruner.kernels.channel_importance import channel_importance
from adapruner.model.big_model import weights
from adapruner.scoring.importance import LinearStats, needs
from adapruner.scoring.metrics import DEFAULT_METRIC
from adapruner.scoring.metrics import metric as registered

try:
    import torch_pruning as tp
    from torch_pruning.pruner import function
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "adapruner.integrations.torch_pruning needs Torch-Pruning: pip install 'adapruner[torch-pruning]'"
    ) from exc


class AdaPrunerImportance(tp.importance.GroupMagnitudeImportance):
    """Torch-Pruning `Importance` over adapruner's metrics (`adapruner.scoring.metrics`, all but `random`)."""

    def __init__(
        self,
        metric: str = DEFAULT_METRIC,
        group_reduction: str = "mean",
        normalizer: str | None = "mean",
        stats: Mapping[nn.Module, LinearStats] | None = None,
    ):
        if registered(metric).element is None:
            raise AdaPrunerError(f"metric {metric!r} is Torch-Pruning's RandomImportance: use that")
        super().__init__(p=2, group_reduction=group_reduction, normalizer=normalizer, target_types=[nn.Linear])
        self.metric, self.stats = metric, dict(stats or {})

    def calibrate(self, model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = False) -> None:
        """Collect the statistics the metric needs (gradients, Fisher, input norms or moments) for every Linear of
        `model` but its head, from a forward(+backward) over `input_ids` (see `adapruner.scoring.collect`)."""
        from adapruner.scoring.collect import collect_input_moments, collect_stats

        head = model.get_output_embeddings()
        linears = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head
        }
        required = needs(self.metric)
        by_name = (
            collect_stats(model, linears, input_ids, required - {"act_var"}, progress, batch_size)
            if required - {"act_var"}
            else {}
        )
        if "act_var" in required:
            for name, moments in collect_input_moments(
                model, linears, input_ids, batch_size=batch_size, progress=progress
            ).items():
                by_name.setdefault(name, LinearStats()).act_var = moments.variance
        self.stats.update({linears[name]: entry for name, entry in by_name.items()})

    def linear_scores(self, layer: nn.Linear, dim: int) -> torch.Tensor | None:
        """adapruner's channel scores of `layer` along `dim` (0: outputs, 1: inputs); None where the metric skips it."""
        stats = self.stats.get(layer, LinearStats())
        missing = [n for n in needs(self.metric) if getattr(stats, n) is None]
        if missing:
            raise AdaPrunerError(f"metric {self.metric!r} needs {missing[0]}: call calibrate(model, input_ids) first")
        with weights(layer):
            weight = layer.weight.detach()
            if registered(self.metric).columns_only and dim == 0:
                return None
            return channel_importance(
                self.metric, weight, dim, stats.grad, stats.fisher, stats.act_norm, act_var=stats.act_var
            )

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, prune_fn = dep.layer, dep.pruning_fn
            if not isinstance(layer, nn.Linear):
                continue
            if prune_fn == function.prune_linear_out_channels:
                scores = self.linear_scores(layer, 0)
            elif prune_fn == function.prune_linear_in_channels:
                scores = self.linear_scores(layer, 1)
            else:
                continue
            if scores is None:
                continue
            group_imp.append(scores.float()[torch.as_tensor(idxs, device=scores.device)])
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class AdapPrunerImportance(AdaPrunerImportance):
    """Deprecated for one release: the old spelling of `AdaPrunerImportance`."""

    def __init__(self, *args, **kwargs):
        warnings.warn("AdapPrunerImportance is now AdaPrunerImportance", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
