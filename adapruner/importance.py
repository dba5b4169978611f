"""Group importance: member channel scores → unit scores → one score per unit by an aggregation.

Public shape (as Torch-Pruning's `Importance`): `Importance(metric, aggregation, stats)(group) -> 1-D tensor`,
higher = more important, one entry per unit of the group.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adapruner.big_model import weights
from adapruner.errors import AdaPrunerError
from adapruner.kernels import METRICS_NEEDING, channel_importance
from adapruner.structure import Group, Member

NEEDS = {**METRICS_NEEDING, "fluct": frozenset({"act_var"})}  # fluct: FLAP's fluctuation, scored on input columns only
METRICS = ("random", *NEEDS)
AGGREGATIONS = ("sum", "mean", "max", "prod", "first")


@dataclass
class LinearStats:
    """Calibration statistics of one linear (fp32).

    grad: G = ∂(Σ_s L_s)/∂W (out × in); fisher: F = mean_s (∂L_s/∂W)² (out × in);
    act_norm: a_i = ‖x_i‖₂ over all calibration tokens of input feature i (in,);
    act_var: v_i = mean x_i² − (mean x_i)² over the calibration tokens (in,).
    """

    grad: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    act_norm: torch.Tensor | None = None
    act_var: torch.Tensor | None = None


def needs(metric: str) -> frozenset[str]:
    """The statistics a metric reads (empty for data-free metrics)."""
    check_metric(metric)
    return NEEDS.get(metric, frozenset())


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise AdaPrunerError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")


def check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise AdaPrunerError(f"unknown aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)}")


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


class Importance:
    """`Importance(metric, aggregation, stats)(group)` → fp32 (or fp64 for `prod`) score per unit of `group`.

    `stats` maps member module names to `LinearStats`; data-free metrics (`l1`, `l2`, `random`) ignore it.
    `random` draws uniform scores, reproducible from `seed` and the member's name.
    """

    def __init__(self, metric: str, aggregation: str = "sum", stats: Mapping[str, LinearStats] | None = None, seed: int = 0):
        check_metric(metric)
        check_aggregation(aggregation)
        self.metric, self.aggregation, self.stats, self.seed = metric, aggregation, stats or {}, seed

    def channel_scores(self, member: Member) -> torch.Tensor:
        """Scores of every channel along the member's pruned dimension (subclasses change where data comes from)."""
        with weights(member.linear) as linear:
            return self._weight_scores(member, linear.weight.detach())

    def _weight_scores(self, member: Member, weight: torch.Tensor) -> torch.Tensor:
        if self.metric == "random":
            digest = hashlib.sha256(f"{self.seed}:{member.name}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            return torch.rand(weight.shape[member.dim], generator=generator).to(weight.device)
        stats = self.stats.get(member.name, LinearStats())
        missing = [n for n in needs(self.metric) if getattr(stats, n) is None]
        if missing:
            raise AdaPrunerError(f"metric {self.metric!r} needs {missing[0]} of {member.name}: pass calibration data (--calib)")
        if self.metric == "fluct":
            return fluctuation(weight, stats.act_var)
        return channel_importance(self.metric, weight, member.dim, stats.grad, stats.fisher, stats.act_norm)

    def member_scores(self, member: Member) -> torch.Tensor:
        """Unit scores of one member, shape (units,)."""
        return unit_scores(self.channel_scores(member).float(), member.block)

    def __call__(self, group: Group) -> torch.Tensor:
        members = [m for m in group.members if m.dim == 1] if self.metric == "fluct" else group.members  # fluct reads input columns
        return aggregate(torch.stack([self.member_scores(m) for m in members]), self.aggregation)


def fluctuation(weight: torch.Tensor, act_var: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation per input column i: v_i · ‖W[:, i]‖² (the `l2` column scores times the input variance)."""
    return channel_importance("l2", weight, 1) * act_var.to(weight.device).float()
