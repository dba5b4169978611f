"""The allocation registry: each allocation (how many units every pruned layer loses) declared once, with how its
counts come, what it reads and what it refuses. Code asks a rule's fields; nothing else branches on a name.

The counting functions themselves live in `adapruner.choosing.allocation`; `adapruner.choosing.selection.allocate` picks
them by `Allocation.counts`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from adapruner.errors import AdaPrunerError

Counting = Literal["ratio", "ranked", "refit_error"]


@dataclass(frozen=True)
class Allocation:
    """One allocation rule.

    `counts`: `ratio` — per-layer fractions, no scores read (`budget_counts`, `checked_ratio_counts`); `ranked` —
    standardised unit scores ranked across layers under one budget (`global_counts`); `refit_error` — the greedy OBS
    curves of each module's refit error, cheapest per parameter first (`error_counts`), which read the output
    projections' input Gram and so cannot reach MoE experts. `sloped`: takes `--depth-slope`. `relative`: each
    module's error curve is normalised by its output energy. `output_fisher`: each output row is weighted by the
    module's output Fisher (the error then estimates the loss increase)."""

    name: str
    help: str
    counts: Counting
    sloped: bool = False
    relative: bool = False
    output_fisher: bool = False

    @property
    def scored(self) -> bool:
        """Reads unit scores to count (else the counts come from the ratio or budget alone)."""
        return self.counts != "ratio"

    @property
    def refit_error(self) -> bool:
        """Costs removals by the refit error: needs the inputs' Gram; MoE experts refused."""
        return self.counts == "refit_error"


RULES = (
    Allocation("uniform", "every layer loses the same fraction", "ratio"),
    Allocation("depth", "a fraction growing (slope > 0) or shrinking with depth", "ratio", sloped=True),
    Allocation(
        "global", "standardised scores ranked across all layers and modules under one parameter budget", "ranked"
    ),
    Allocation(
        "error",
        "the refit's relative output error per parameter, least first across layers and modules",
        "refit_error",
        relative=True,
    ),
    Allocation(
        "loss",
        "that error weighted by each output's Fisher (the estimated loss increase) per parameter",
        "refit_error",
        output_fisher=True,
    ),
)
ALLOCATIONS = tuple(rule.name for rule in RULES)
DEFAULT_ALLOCATION = "uniform"  # the plain method's (AdaPruner, LLM-Pruner); the best recipe names its own
_BY_NAME = {rule.name: rule for rule in RULES}


def allocation(name: str) -> Allocation:
    """The rule named `name`; an unknown name is a one-line error."""
    if name not in _BY_NAME:
        raise AdaPrunerError(f"unknown allocation {name!r}: use one of {', '.join(ALLOCATIONS)}")
    return _BY_NAME[name]


def names_where(test: Callable[[Allocation], bool]) -> tuple[str, ...]:
    """The allocations whose rule passes `test` (for messages and help: e.g. `names_where(lambda a: a.scored)`)."""
    return tuple(rule.name for rule in RULES if test(rule))


def any_refit_error(names: Iterable[str]) -> bool:
    """Whether one of the allocations `names` costs removals by the refit error (needs the inputs' Gram)."""
    return any(allocation(name).refit_error for name in names)


def any_output_fisher(names: Iterable[str]) -> bool:
    """Whether one of the allocations `names` weighs by the output Fisher."""
    return any(allocation(name).output_fisher for name in names)


def help_text() -> str:
    """`name: what it does` for every allocation, for the CLI's help."""
    return "; ".join(f"{rule.name}: {rule.help}" for rule in RULES)
