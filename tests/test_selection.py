"""Choosing the units to keep (`adapruner.choosing.selection`): the highest scores stay (ties to the lower index),
ratio semantics and their errors, the depth profile, the error curves the `error` allocation ranks, and plans that
keep the units a hand-computed score ranks first."""

import pytest
import torch

from adapruner.choosing.allocation import removal_count
from adapruner.choosing.selection import (
    depth_profile,
    plan_allocation,
    plan_from_counts,
    plan_pruning,
    removal_curves,
    scoreless_counts,
    top_units,
)
from adapruner.choosing.spec import PruneSpec
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import layer_info
from adapruner.scoring.importance import Importance
from adapruner.scoring.obs import Removal
from tests.models import tiny_llama


def test_query_granularity_removes_equally_in_every_kv_group(gqa_model):
    plan = plan_pruning(gqa_model, Importance("l1"), 0.34, range(0, 1), "query")
    keep_q, keep_kv = plan.attention[0]
    assert keep_kv == [0, 1]
    assert [q // 3 for q in keep_q] == [0, 0, 1, 1]


def test_lowest_scores_are_removed():
    assert top_units(torch.tensor([0.3, 0.1, 0.9, 0.2]), 2) == [0, 2]
    assert top_units(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]
    assert removal_count(3, 0.25) == 1 and removal_count(1536, 0.25) == 384


def test_ratio_errors(gqa_model):
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(AdaPrunerError, match=r"outside \(0, 1\)"):
            plan_pruning(gqa_model, Importance("l1"), bad, range(0, 1))
    with pytest.raises(AdaPrunerError, match="would remove all 2 key/value groups"):
        plan_pruning(gqa_model, Importance("l1"), 0.9, range(0, 1), "kv")


def test_too_small_ratio_warns_and_keeps_attention(gqa_model):
    with pytest.warns(UserWarning, match="removes no attention unit"):
        plan = plan_pruning(gqa_model, Importance("l1"), 0.1, range(0, 1), "kv")
    assert plan.attention[0] == ([0, 1, 2, 3, 4, 5], [0, 1])
    assert len(plan.mlp[0]) == 24 - 2


def test_the_depth_profile_by_hand():
    """Five layers at slope 0.5: positions 0, ¼, ½, ¾, 1 give weights ½, ¾, 1, 5/4, 3/2 around the mean ratio."""
    profile = depth_profile(0.2, range(2, 7), 0.5)
    assert list(profile) == [2, 3, 4, 5, 6]
    assert list(profile.values()) == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3])
    assert depth_profile(0.3, range(4, 5), 0.9) == {4: pytest.approx(0.3)}  # one layer: no slope to apply
    assert list(depth_profile(0.25, range(0, 4), -0.6).values()) == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_removal_curves_by_hand():
    """Attention: a step per unit; MLP: a step of m channels adds its cost in m equal parts; `relative` divides by
    the module's output energy; `align` keeps every align-th point of the MLP curve (whole blocks)."""
    removals = {
        (0, "attn"): Removal([[1], [0]], [1.0, 3.0], 2, energy=8.0),
        (0, "mlp"): Removal([[2, 0], [1], [3]], [4.0, 3.0, 1.0], 4, energy=10.0),
    }
    absolute = removal_curves(removals, relative=False)
    assert absolute[(0, "attn")].tolist() == [0.0, 1.0, 4.0]
    assert absolute[(0, "mlp")].tolist() == [0.0, 2.0, 4.0, 7.0, 8.0]
    relative = removal_curves(removals)
    assert relative[(0, "attn")].tolist() == pytest.approx([0.0, 0.125, 0.5])
    assert relative[(0, "mlp")].tolist() == pytest.approx([0.0, 0.2, 0.4, 0.7, 0.8])
    aligned = removal_curves(removals, align=2, relative=False)
    assert aligned[(0, "mlp")].tolist() == [0.0, 4.0, 8.0] and aligned[(0, "attn")].tolist() == [0.0, 1.0, 4.0]


def test_plan_from_counts_keeps_the_best_scored_units_by_hand():
    """6 query heads in 2 kv groups of 3, 24 channels: by kv group the better group stays whole; by query head each
    group keeps its best two; the MLP keeps all but its lowest-scored channels; a count of every unit removes the
    block."""
    model = tiny_llama(6, 2)
    mlp = torch.ones(24)
    mlp[[5, 11, 17]] = 0.0
    rest = [c for c in range(24) if c not in (5, 11, 17)]
    by_kv = plan_from_counts(model, {(0, "attn"): torch.tensor([0.2, 0.7]), (0, "mlp"): mlp}, {0: (1, 3)}, "kv")
    assert by_kv.attention[0] == ([3, 4, 5], [1]) and by_kv.mlp[0] == rest
    heads = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.8, 0.2])
    by_query = plan_from_counts(model, {(1, "attn"): heads}, {1: (1, 0)}, "query")
    assert by_query.attention[1] == ([0, 2, 3, 4], [0, 1]) and by_query.mlp == {}
    # every unit: the block goes (a query-granularity attention block takes its kv heads along)
    assert plan_from_counts(model, {(0, "mlp"): mlp}, {0: (0, 24)}, "kv").mlp[0] == []
    assert plan_from_counts(model, {(0, "attn"): torch.tensor([0.2, 0.7])}, {0: (2, 0)}, "kv").attention[0] == ([], [])
    assert plan_from_counts(model, {(1, "attn"): heads}, {1: (3, 0)}, "query").attention[1] == ([], [])


def test_a_depth_allocation_by_ratio_keeps_the_top_l2_channels_of_each_layer():
    """ratio 0.25, slope 0.5 over layers 0..2: per-layer ratios 0.125, 0.25, 0.375 remove 3, 6 and 9 of 24 channels,
    and the channels kept are those of the highest l2 sum over gate and up rows and the down column."""
    model = tiny_llama(6, 2)
    spec = PruneSpec(0.25, layers="0:3", metric="l2", allocation="depth", depth_slope=0.5, prune_attention=False)
    assert scoreless_counts(model, spec, range(3)) == {0: (0, 3), 1: (0, 6), 2: (0, 9)}
    plan = plan_allocation(model, Importance("l2"), spec)
    assert plan.attention == {}
    for index, n_remove in zip(range(3), (3, 6, 9)):
        mlp = layer_info(model, index).mlp
        with torch.no_grad():
            l2 = (
                mlp.gate_proj.weight.square().sum(1)
                + mlp.up_proj.weight.square().sum(1)
                + mlp.down_proj.weight.square().sum(0)
            )
        assert plan.mlp[index] == sorted(l2.argsort(descending=True)[: 24 - n_remove].tolist())


@pytest.mark.parametrize("name", ["global", "error", "loss"])
def test_scored_allocations_have_no_scoreless_counts(name):
    assert scoreless_counts(tiny_llama(), PruneSpec(0.25, allocation=name), range(3)) is None
