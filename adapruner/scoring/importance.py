"""Group importance: member channel scores → unit scores → one score per unit by an aggregation.

Public shape (as Torch-Pruning's `Importance`): `Importance(metric, aggregation, stats)(group) -> 1-D tensor`,
higher = more important, one entry per unit of the group.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adapruner.choosing.allocation_rules import any_refit_error, names_where
from adapruner.choosing.spec import DEFAULT_OBS_DAMP, check_aggregation
from adapruner.errors import AdaPrunerError
from adapruner.kernels.channel_importance import channel_importance
from adapruner.model.big_model import execution_device, weights
from adapruner.model.structure import Group, Member
from adapruner.scoring.metrics import Metric
from adapruner.scoring.metrics import metric as registered
from adapruner.scoring.obs import (
    Removal,
    greedy_removal,
    inverse_hessian,
    ordered_removal,
    output_energy,
    unit_costs,
)


@dataclass
class LinearStats:
    """Calibration statistics of one linear (fp32).

    grad: G = ∂(Σ_s L_s)/∂W (out × in); fisher: F = mean_s (∂L_s/∂W)² (out × in);
    act_norm: a_i = ‖x_i‖₂ over all calibration tokens of input feature i (in,);
    act_var: v_i = mean x_i² − (mean x_i)² over the calibration tokens (in,);
    act_cov: Σ = mean x xᵀ − μμᵀ over the calibration tokens (in × in; the output projections, for `obs`);
    out_fisher: f_r = mean_s Σ_{t∈s} (∂L_s/∂y_tr)² of the outputs (out,; the output projections, for the `loss`
    allocation, `collect.collect_output_fisher`).
    """

    grad: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    act_norm: torch.Tensor | None = None
    act_var: torch.Tensor | None = None
    act_cov: torch.Tensor | None = None
    out_fisher: torch.Tensor | None = None


COLLECTED_STATS = frozenset({"grad", "fisher", "act_norm"})  # what `collect.collect_stats` gathers


@dataclass
class InputMoments:
    """Moments of a linear's calibration inputs over their T tokens (fp32): μ = mean x (in,), mean x² (in,) and
    C = XᵀX/T (in × in; lsq only)."""

    mean: torch.Tensor
    square_mean: torch.Tensor
    gram: torch.Tensor | None = None

    @property
    def variance(self) -> torch.Tensor:
        """Per input channel: mean x² − (mean x)², clamped at 0 (FLAP's fluctuation)."""
        return (self.square_mean - self.mean.square()).clamp_min(0.0)

    @property
    def covariance(self) -> torch.Tensor:
        """Σ = C − μμᵀ (needs the Gram)."""
        return self.gram - torch.outer(self.mean, self.mean)

    def to(self, device: torch.device | str) -> InputMoments:
        """These moments on `device`."""
        return InputMoments(
            self.mean.to(device), self.square_mean.to(device), None if self.gram is None else self.gram.to(device)
        )


MOMENT_STATS = frozenset({"act_norm", "act_var", "act_cov"})  # what input moments give (`collect.moment_stats`)


def needs(metric: str) -> frozenset[str]:
    """The statistics a metric reads (empty for data-free metrics)."""
    return registered(metric).needs


def aggregate(member_scores: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Combine a (members × units) score matrix over members: sum | mean | max | prod | first (the root)."""
    check_aggregation(aggregation)
    if aggregation == "sum":
        return member_scores.sum(0)
    if aggregation == "mean":
        return member_scores.mean(0)
    if aggregation == "max":
        return member_scores.max(0).values
    if aggregation == "prod":
        return member_scores.double().prod(0)
    return member_scores[0]


def unit_scores(channel_scores: torch.Tensor, block: int) -> torch.Tensor:
    """Sum channel scores over each unit's `block` consecutive channels (e.g. a head's head_dim rows)."""
    return channel_scores.view(-1, block).sum(1)


EXPERTS_BY_WEIGHT = (
    "metric {metric!r} reads calibration statistics, which do not reach MoE experts: adapruner scores MoE experts from "
    "their weights (l1, l2, random); pass one of those, or --no-mlp to prune attention alone"
)


EXPERTS_BY_ERROR = (
    f"--allocation {' and '.join(names_where(lambda a: a.refit_error))} read the output projections' inputs, which "
    f"MoE experts do not keep: use {', '.join(names_where(lambda a: not a.refit_error))}, or --no-mlp"
)
EXPERTS_SEQUENTIAL = "--sequential reads each layer's linears, which MoE experts are not: drop it, or pass --no-mlp"


def check_expert_metrics(
    metrics, prune_mlp: bool, moe: bool, allocations: tuple[str, ...] = (), sequential: bool = False
) -> None:
    """Refuse, in one line, what MoE experts cannot be pruned by: metrics that need statistics, the error
    allocation, sequential pruning."""
    if not (moe and prune_mlp):
        return
    data = [m for m in metrics if registered(m).needs]
    if data:
        raise AdaPrunerError(EXPERTS_BY_WEIGHT.format(metric=data[0]))
    if any_refit_error(allocations):
        raise AdaPrunerError(EXPERTS_BY_ERROR)
    if sequential:
        raise AdaPrunerError(EXPERTS_SEQUENTIAL)


class Importance:
    """`Importance(metric, aggregation, stats)(group)` → fp32 (or fp64 for `prod`) score per unit of `group`.

    `stats` maps member module names to `LinearStats`; data-free metrics (`l1`, `l2`, `random`) ignore it.
    `random` draws uniform scores, reproducible from `seed` and the member's name. `obs` scores a unit by the output
    error of removing it alone after the damped refit (`adapruner.scoring.obs`, damping `damp`), and `removal` gives the
    greedy order that refits between steps.
    """

    def __init__(
        self,
        metric: str,
        aggregation: str = "sum",
        stats: Mapping[str, LinearStats] | None = None,
        seed: int = 0,
        damp: float = DEFAULT_OBS_DAMP,
        grams: Mapping[str, InputMoments] | None = None,
    ):
        self.definition = registered(metric)  # the metric's registry entry
        check_aggregation(aggregation)
        self.metric, self.aggregation, self.stats, self.seed = metric, aggregation, stats or {}, seed
        self.damp = damp
        self.grams = grams or {}  # where a member's Σ is formed when it is read, if `stats` holds none (streamed)

    @property
    def spec(self) -> Metric:
        """Deprecated for one release: the metric's registry entry is `definition` ("spec" is a `PruneSpec`)."""
        warnings.warn("Importance.spec is now Importance.definition", DeprecationWarning, stacklevel=2)
        return self.definition

    def channel_scores(self, member: Member) -> torch.Tensor:
        """Scores of every channel along the member's pruned dimension (subclasses change where data comes from)."""
        with weights(member.linear) as linear:
            return self._weight_scores(member, linear.weight.detach())

    def _weight_scores(self, member: Member, weight: torch.Tensor) -> torch.Tensor:
        if self.definition.element is None and not self.definition.needs:  # random
            digest = hashlib.sha256(f"{self.seed}:{member.name}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            return torch.rand(weight.shape[member.dim], generator=generator).to(weight.device)
        if member.weights_only and self.definition.needs:
            raise AdaPrunerError(EXPERTS_BY_WEIGHT.format(metric=self.metric))
        stats = self.stats.get(member.name, LinearStats())
        missing = [n for n in needs(self.metric) if getattr(stats, n) is None]
        if missing:
            raise AdaPrunerError(
                f"metric {self.metric!r} needs {missing[0]} of {member.name}: pass calibration data (--calib)"
            )
        return channel_importance(
            self.metric, weight, member.dim, stats.grad, stats.fisher, stats.act_norm, act_var=stats.act_var
        )

    def member_scores(self, member: Member) -> torch.Tensor:
        """Unit scores of one member, shape (units,)."""
        if self.definition.surgeon:
            with weights(member.linear) as linear:
                return unit_costs(linear.weight.detach(), self.inverse_hessian(member), member.block).float()
        return unit_scores(member.channels(self.channel_scores(member)).float(), member.block)

    def covariance(self, member: Member) -> torch.Tensor:
        """Σ of the member's calibration inputs (an output projection's), from the live statistics — or formed now
        from its input moments in `grams` (C − μμᵀ, on the member's device: one module's Σ there at a time)."""
        stats = self.stats.get(member.name, LinearStats())
        if stats.act_cov is not None:
            return stats.act_cov
        if member.name in self.grams:
            return self.grams[member.name].to(execution_device(member.linear)).covariance
        raise AdaPrunerError(f"{self.metric} needs the input covariance of {member.name}: pass calibration data")

    def inverse_hessian(self, member: Member) -> torch.Tensor:
        """(Σ + λI)⁻¹ of the member's inputs (`obs.inverse_hessian`; not kept: a 7B model's would fill a GPU)."""
        return inverse_hessian(self.covariance(member), self.damp)

    def output_fisher(self, member: Member) -> torch.Tensor:
        """f (out,) of the member's outputs (an output projection's), from the live statistics."""
        stats = self.stats.get(member.name, LinearStats())
        if stats.out_fisher is None:
            raise AdaPrunerError(
                f"the loss allocation needs the output Fisher of {member.name}: pass calibration data (--calib)"
            )
        return stats.out_fisher

    def removal(
        self,
        group: Group,
        n_remove: int,
        groups: int = 1,
        batch: int = 1,
        priority: torch.Tensor | None = None,
        loss_weighted: bool = False,
    ) -> Removal:
        """Greedy OBS removal of `n_remove` units (steps of one unit per group with `groups` > 1, else of `batch`
        units) from the group's output projection, in the order of the OBS costs (`obs`) or of this metric's scores
        (any other; `priority` where they are at hand), each step costed by OBS: the error the removal adds after the
        refit. `loss_weighted`: every output row r weighs f_r (`output_fisher`), i.e. OBS on diag(√f) W — the refit
        is row by row, so the same refit, costed as Σ_r f_r δ_r²: twice the loss increase to second order. The
        removal's `energy` is the (weighted) output's, `obs.output_energy`."""
        member = next(m for m in group.members if m.dim == 1)
        if priority is None and not self.definition.surgeon:
            priority = self(group)
        covariance = self.covariance(member)
        with weights(member.linear) as linear:
            weight = linear.weight.detach()
            if loss_weighted:
                weight = weight * self.output_fisher(member).to(weight.device).sqrt()[:, None]
            if priority is not None:  # a fixed order: one factorisation costs every step (`obs.ordered_removal`)
                removing = (n_remove, batch, groups)
                return ordered_removal(weight, covariance, self.damp, member.block, removing, priority)
            removal = greedy_removal(
                weight, inverse_hessian(covariance, self.damp), member.block, n_remove, batch, groups
            )
            removal.energy = output_energy(weight, covariance, self.damp)
        return removal

    def __call__(self, group: Group) -> torch.Tensor:
        members = [m for m in group.members if m.dim == 1] if self.definition.columns_only else group.members
        return aggregate(torch.stack([self.member_scores(m) for m in members]), self.aggregation)
