"""The pruning spec (`adapruner.choosing.spec`): `check` refuses every out-of-range field in one line naming the
flag and passes the edges of each range, `target_params` wins over `ratio`, and the spec round-trips through a dict
(and JSON, as `best.json` holds it)."""

import json
from dataclasses import fields

import pytest

from adapruner.choosing.spec import PruneSpec
from adapruner.errors import AdaPrunerError


def test_a_spec_saved_before_the_new_fields_reads_with_their_defaults():
    old = {k: v for k, v in PruneSpec(0.3, metric="act").to_dict().items() if k not in ("obs_damp", "sequential")}
    assert PruneSpec.from_dict(old) == PruneSpec(0.3, metric="act")
    with pytest.raises(AdaPrunerError, match="holds only the fields"):
        PruneSpec.from_dict({**old, "magic": 1})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ratio": 0.0}, "ratio 0.0 is outside (0, 1)"),
        ({"ratio": 1.0}, "ratio 1.0 is outside (0, 1)"),
        ({"ratio": None}, "ratio None is outside (0, 1)"),
        ({"target_params": 1.0}, "--target-params 1.0 is outside (0, 1)"),
        ({"target_params": -0.2}, "--target-params -0.2 is outside (0, 1)"),
        ({"metric": "magic"}, "unknown metric 'magic'"),
        ({"aggregation": "median"}, "unknown aggregation 'median': use one of sum, mean, max, prod, first"),
        ({"allocation": "magic"}, "unknown allocation 'magic'"),
        ({"compensation": "full"}, "unknown compensation 'full': use one of none, bias, lsq"),
        ({"granularity": "head"}, "unknown attention granularity 'head': use one of kv, query"),
        ({"prune_attention": False, "prune_mlp": False}, "leaves nothing to prune"),
        ({"depth_slope": 1.0}, "--depth-slope 1.0 is outside (-1, 1)"),
        ({"depth_slope": -1.0}, "--depth-slope -1.0 is outside (-1, 1)"),
        ({"min_keep": 1.0}, "--min-keep 1.0 is outside [0, 1)"),
        ({"min_keep": -0.1}, "--min-keep -0.1 is outside [0, 1)"),
        ({"align": 0}, "--align 0: pass a whole number of channels, at least 1"),
        ({"align": 2.0}, "--align 2.0: pass a whole number of channels, at least 1"),
        ({"obs_damp": 0.0}, "--obs-damp 0.0: the obs metric needs a damping above 0"),
        ({"compensation": "lsq", "damp": 0.0}, "--damp 0.0: lsq compensation needs a damping above 0"),
    ],
)
def test_check_refuses_each_bad_field_in_one_line_naming_it(changes, message):
    with pytest.raises(AdaPrunerError) as raised:
        PruneSpec().with_(**changes).check()
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"ratio": 0.99},
        {"depth_slope": -0.99, "allocation": "depth"},
        {"min_keep": 0.0},
        {"align": 64},
        {"compensation": "none", "damp": 0.0},  # the damping is read by lsq alone
        {"prune_attention": False},
        {"prune_mlp": False},
        {"ratio": None, "target_params": 0.2},  # a budget needs no ratio
        {"ratio": 5.0, "target_params": 0.2},  # target_params wins: the ratio is not read
    ],
)
def test_check_passes_the_edges_of_each_range_and_returns_the_spec(changes):
    spec = PruneSpec().with_(**changes)
    assert spec.check() is spec


def test_the_depth_slope_counts_only_under_the_depth_allocation():
    assert PruneSpec(depth_slope=0.4, allocation="depth").slope == 0.4
    assert PruneSpec(depth_slope=-0.3, allocation="depth").slope == -0.3
    for name in ("uniform", "global", "error", "loss"):
        assert PruneSpec(depth_slope=0.4, allocation=name).slope == 0.0


def test_every_field_round_trips_through_a_dict_and_json():
    spec = PruneSpec(
        None,
        target_params=0.2,
        layers="1:5",
        granularity="query",
        prune_attention=False,
        metric="obs",
        aggregation="max",
        allocation="depth",
        depth_slope=-0.5,
        min_keep=0.1,
        compensation="lsq",
        damp=0.3,
        same_size=True,
        align=8,
        obs_damp=0.05,
        sequential=True,
        inexact_heads=True,
    )
    data = spec.to_dict()
    assert set(data) == {f.name for f in fields(PruneSpec)}
    assert all(data[f.name] != f.default for f in fields(PruneSpec) if f.name != "prune_mlp")  # none left default
    assert PruneSpec.from_dict(data) == spec
    assert PruneSpec.from_dict(json.loads(json.dumps(data))) == spec


def test_with_gives_a_changed_copy_and_from_dict_refuses_what_is_no_dict():
    spec = PruneSpec(0.3)
    changed = spec.with_(metric="l2", layers="all")
    assert (spec.metric, spec.layers) == (PruneSpec().metric, None)
    assert changed == PruneSpec(0.3, metric="l2", layers="all")
    with pytest.raises(AdaPrunerError, match="holds only the fields"):
        PruneSpec.from_dict([("ratio", 0.3)])
