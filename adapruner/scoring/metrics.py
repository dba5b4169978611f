"""The importance metrics, each declared once (formulas: docs/metrics.md).

A `Metric` says what it reads and how each path scores it: the live statistics of `LinearStats` it needs
(`needs`), how a search trial scores it from the activation cache (`cached`), its code in the fused Triton kernel
(`kernel_code`, None: torch only) and its per-element score for the torch reference (`element`, fp32; the channel
score sums it over the other dimension, or takes |Σ| for `sum_then_abs`). The kernels, importance, cache, search
space, CLI choices and error messages all read `METRICS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from adapruner.errors import AdaPrunerError

CacheSource = Literal[
    "weights", "sample_products", "sample_fisher", "input_squares", "input_moments", "input_gram", "activations"
]
Element = Callable[..., torch.Tensor]  # element(w, grad=, fisher=, act_norm=, act_var=) → per-element fp32 score


@dataclass(frozen=True)
class Metric:
    """One importance metric: `needs` ⊆ {grad, fisher, act_norm, act_var}; `cached`: which cache rows a trial reads
    (weights: none; sample_products: per-sample Σ w·g; sample_fisher: per-sample Σ w²g²; input_squares: Σ x²;
    input_moments: Σ x and Σ x²; input_gram: Σ x and X for XᵀX; activations: X and dY); `columns_only`: scores input
    columns only (o_proj, down_proj); `surgeon`: scores whole units by the OBS cost (`adapruner.scoring.obs`), not per
    element; `searched`: in the search's default space."""

    name: str
    needs: frozenset[str]
    cached: CacheSource
    kernel_code: int | None = None
    element: Element | None = None
    sum_then_abs: bool = False
    columns_only: bool = False
    surgeon: bool = False
    searched: bool = True


def _input(w: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """An input-feature statistic (in,) broadcast along the rows of w (out × in)."""
    return stat.float().unsqueeze(0).expand_as(w)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("random", frozenset(), "weights", searched=False),
        Metric("l1", frozenset(), "weights", 0, lambda w, **_: w.abs()),
        Metric("l2", frozenset(), "weights", 1, lambda w, **_: w.square()),
        Metric("taylor1", frozenset({"grad"}), "activations", 2, lambda w, grad, **_: (w * grad.float()).abs()),
        Metric(
            "vector",
            frozenset({"grad"}),
            "sample_products",
            3,
            lambda w, grad, **_: w * grad.float(),
            sum_then_abs=True,
        ),
        Metric(
            "taylor2",
            frozenset({"fisher"}),
            "sample_fisher",
            4,
            lambda w, fisher, **_: 0.5 * w.square() * fisher.float(),
        ),
        Metric(
            "mix",
            frozenset({"grad", "fisher"}),
            "activations",
            5,
            lambda w, grad, fisher, **_: (w * grad.float() - 0.5 * w.square() * fisher.float()).abs(),
        ),
        Metric(
            "act", frozenset({"act_norm"}), "input_squares", 6, lambda w, act_norm, **_: w.abs() * _input(w, act_norm)
        ),
        Metric(
            "fluct",
            frozenset({"act_var"}),
            "input_moments",
            None,
            lambda w, act_var, **_: w.square() * _input(w, act_var),
            columns_only=True,
            searched=False,
        ),
        Metric("obs", frozenset({"act_cov"}), "input_gram", columns_only=True, surgeon=True, searched=False),
    )
}
METRIC_NAMES = tuple(METRICS)
KERNEL_METRICS = tuple(name for name, m in METRICS.items() if m.kernel_code is not None)
ACTIVATION_METRICS = frozenset(name for name, m in METRICS.items() if m.cached in ("activations", "input_gram"))
SEARCHED_METRICS = tuple(name for name, m in METRICS.items() if m.searched)
INPUT_STATS = ("act_norm", "act_var")  # statistics of a linear's input features, shape (in,)
DEFAULT_METRIC = "taylor1"  # LLM-Pruner's element-wise first-order Taylor


def metric(name: str) -> Metric:
    """The registered metric `name`; an unknown name is a one-line error listing the metrics."""
    if name not in METRICS:
        raise AdaPrunerError(f"unknown metric {name!r}: use one of {', '.join(METRIC_NAMES)}")
    return METRICS[name]
