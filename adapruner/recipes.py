"""Named recipes: the measured best (what the CLI does with no flags), the paper's plain method, and the published
peers, each one `--recipe` away.

A recipe fixes the choices that decide quality: for `prune` the metric, aggregation, allocation, compensation with its
damping, attention granularity, pruned layers and calibration windows; for `search` and `run` the space the trials
draw from (and the study's fixed damping, granularity and layers). A flag given on the command line overrides the
recipe's value. Every value of `best` comes from a row of `python -m bench.quality` (bench/results/quality.json;
docs/results.md, "Defaults"). The library's dataclasses (`PruneSpec`, `PruneOptions`, `SearchOptions`) keep the
plain values, so that a library call says what it does; `recipe_prune_options` and `recipe_search_options` give a
recipe to a library caller.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from adapruner.choosing.spec import AGGREGATIONS
from adapruner.cutting.pruning import PruneOptions
from adapruner.errors import AdaPrunerError
from adapruner.scoring.metrics import SEARCHED_METRICS
from adapruner.searching.search import DEFAULT_SAMPLE_COUNTS
from adapruner.searching.search_options import SearchOptions

DEFAULT_RECIPE = "best"


@dataclass(frozen=True)
class Recipe:
    """`prune`: PruneSpec fields and `calib`; `search`: SearchOptions space fields, `damp`, `granularity` and `layers`
    (None: a fixed recipe that has no search)."""

    about: str
    prune: dict
    search: dict | None


PLAIN = dict(  # the prune choices the paper and its peers share: LLM-Pruner's set-up, no refit to damp
    metric="taylor1",
    aggregation="sum",
    allocation="uniform",
    compensation="none",
    damp=1.0,
    granularity="kv",
    layers=None,
)

RECIPES: dict[str, Recipe] = {
    "best": Recipe(
        "the measured best: fluct on 256 wiki windows, the loss allocation over every layer, lsq refit (damp 0.3), "
        "query heads; the search chooses act or fluct and the allocation, scored and refit on the 256-window pool",
        prune=dict(
            metric="fluct",
            aggregation="sum",
            allocation="loss",
            compensation="lsq",
            damp=0.3,
            granularity="query",
            layers="all",
            calib="wiki:256",
        ),
        search=dict(
            metrics=("act", "fluct"),
            aggregations=("sum", "mean", "max"),
            sample_counts=(8, 16, 32),
            allocations=("uniform", "global", "loss"),
            compensations=("lsq",),
            statistics=("refit",),
            refit_calib="wiki:256",
            damp=0.3,
            granularity="query",
            layers="all",
        ),
    ),
    "paper": Recipe(
        "AdaPruner as published: no compensation, uniform allocation, whole kv groups; the search draws samples, "
        "metric and aggregation",
        prune=PLAIN | dict(calib="wiki:16"),
        search=dict(
            metrics=SEARCHED_METRICS,
            aggregations=AGGREGATIONS,
            sample_counts=DEFAULT_SAMPLE_COUNTS,
            allocations=("uniform",),
            compensations=("none",),
            statistics=("subset",),
            refit_calib=None,
            damp=1.0,
            granularity="kv",
            layers=None,
        ),
    ),
    "llm-pruner": Recipe(
        "LLM-Pruner: element-wise first-order Taylor, sum, uniform, whole kv groups, no compensation",
        prune=PLAIN | dict(calib="wiki:32"),
        search=None,
    ),
    "flap": Recipe(
        "FLAP: fluctuation metric, global allocation of standardised scores, bias compensation",
        prune=PLAIN
        | dict(metric="fluct", allocation="global", compensation="bias", granularity="query", calib="wiki:32"),
        search=None,
    ),
}


def recipe(name: str) -> Recipe:
    """The recipe `name`; an unknown one is a one-line error listing them."""
    if name not in RECIPES:
        raise AdaPrunerError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    return RECIPES[name]


def search_recipe(name: str) -> dict:
    """The search space of recipe `name`; a fixed recipe (a peer's) is a one-line error."""
    space = recipe(name).search
    if space is None:
        searchable = ", ".join(n for n, r in RECIPES.items() if r.search is not None)
        raise AdaPrunerError(f"--recipe {name} is a fixed recipe for `prune`: search with --recipe {searchable}")
    return space


def recipe_search_options(name: str = DEFAULT_RECIPE, **fields) -> SearchOptions:
    """The `SearchOptions` of recipe `name`'s space (its damping and granularity in the study's spec), updated with
    `fields` (e.g. spec=..., trials=30; a given spec takes the recipe's damping, granularity and layers)."""
    space = dict(search_recipe(name))
    damp, granularity, layers = space.pop("damp"), space.pop("granularity"), space.pop("layers")
    spec = fields.pop("spec", SearchOptions().spec).with_(damp=damp, granularity=granularity, layers=layers)
    return SearchOptions(spec=spec, **(space | fields))


def recipe_prune_options(name: str = DEFAULT_RECIPE, **spec_fields) -> PruneOptions:
    """The `PruneOptions` of recipe `name`, its spec updated with `spec_fields` (e.g. target_params=0.2)."""
    values = dict(recipe(name).prune) | spec_fields
    calib = values.pop("calib")
    options = PruneOptions(calib=calib)
    return replace(options, spec=options.spec.with_(**values))
