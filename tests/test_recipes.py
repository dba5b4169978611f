"""Named recipes (`adapruner.recipes`): unknown and fixed recipes are one-line errors, `paper` is the settings
objects' own defaults, every recipe is a valid spec holding its values, a caller's fields override them, and the
peers differ from the plain method where their descriptions say."""

from dataclasses import fields

import pytest

from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.pruning import PruneOptions
from adapruner.errors import AdaPrunerError
from adapruner.recipes import RECIPES, recipe, recipe_prune_options, recipe_search_options, search_recipe
from adapruner.searching.search import SearchSpace
from adapruner.searching.search_options import SearchOptions

SEARCHABLE = [name for name, r in RECIPES.items() if r.search is not None]
FIXED = [name for name, r in RECIPES.items() if r.search is None]
STUDY_FIELDS = ("damp", "granularity", "layers")  # a search recipe's fixed study settings, in its spec


def test_an_unknown_recipe_is_one_line_listing_them():
    with pytest.raises(AdaPrunerError) as raised:
        recipe("magic")
    assert str(raised.value) == f"unknown recipe 'magic': use one of {', '.join(RECIPES)}"


@pytest.mark.parametrize("name", FIXED)
def test_a_fixed_recipe_has_no_search_and_names_those_that_do(name):
    assert FIXED and SEARCHABLE
    with pytest.raises(AdaPrunerError) as raised:
        search_recipe(name)
    assert f"search with --recipe {', '.join(SEARCHABLE)}" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(AdaPrunerError):
        recipe_search_options(name)


def test_the_paper_recipe_is_the_settings_objects_own_defaults():
    assert recipe_prune_options("paper") == PruneOptions()
    assert recipe_search_options("paper") == SearchOptions()


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_a_valid_spec_holding_its_values(name):
    values = dict(recipe(name).prune)
    options = recipe_prune_options(name)
    assert options.calib == values.pop("calib")
    assert options.spec.check() is options.spec
    assert {key: getattr(options.spec, key) for key in values} == values
    untouched = {f.name for f in fields(PruneSpec)} - set(values)  # what the recipe leaves at the spec's default
    assert all(getattr(options.spec, key) == getattr(PruneSpec(), key) for key in untouched)


def test_spec_fields_given_to_a_prune_recipe_override_its_values():
    values = dict(recipe("best").prune)
    calib = values.pop("calib")
    expected = PruneOptions(spec=PruneSpec(**{**values, "metric": "act", "target_params": 0.2}), calib=calib)
    assert recipe_prune_options("best", metric="act", target_params=0.2) == expected


@pytest.mark.parametrize("name", SEARCHABLE)
def test_a_search_recipe_fixes_the_study_settings_of_a_given_spec_and_draws_its_space(name):
    space = search_recipe(name)
    given = PruneSpec(None, target_params=0.3, damp=5.0, granularity="kv", layers="0:2", min_keep=0.1)
    options = recipe_search_options(name, spec=given, trials=7)
    assert options.spec == given.with_(**{key: space[key] for key in STUDY_FIELDS})  # its budget and floor kept
    assert options.trials == 7
    drawn = {key: value for key, value in space.items() if key not in STUDY_FIELDS}
    assert {key: getattr(options, key) for key in drawn} == drawn
    trial_space = {key: value for key, value in drawn.items() if key in {f.name for f in fields(SearchSpace)}}
    SearchSpace(**trial_space)  # every name in the space is a registered metric, aggregation, allocation, …


def test_the_peers_differ_from_the_plain_method_where_they_say():
    def differing(a: str, b: str) -> set[str]:
        x, y = recipe_prune_options(a), recipe_prune_options(b)
        return {f.name for f in fields(PruneSpec) if getattr(x.spec, f.name) != getattr(y.spec, f.name)}

    assert differing("llm-pruner", "paper") == set()  # LLM-Pruner's set-up is the paper's (on more windows)
    assert recipe_prune_options("llm-pruner").calib != recipe_prune_options("paper").calib
    assert differing("flap", "llm-pruner") == {"metric", "allocation", "compensation", "granularity"}
    flap = recipe_prune_options("flap").spec
    assert (flap.metric, flap.allocation, flap.compensation) == ("fluct", "global", "bias")
