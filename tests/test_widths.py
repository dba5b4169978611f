"""Per-layer widths (issue 33's first step): every trial's counts meet the budget, shares reproduce counts, and a
trial's assembled variants equal a fresh prune with the same counts, scores and refit."""

import copy
import random

import pytest
import torch

from adapruner.choosing.allocation import removed_by
from adapruner.choosing.selection import allocate, plan_from_counts
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.compensation import refit_updates
from adapruner.cutting.removal import cut
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import output_projections
from adapruner.scoring.sources import CalibrationPasses
from adapruner.searching.widths import LayerVariants, WidthSpace
from tests.models import tiny_llama

SPEC = PruneSpec(target_params=0.15, metric="fluct", allocation="uniform", compensation="lsq", granularity="query")


def calibration() -> torch.Tensor:
    return torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("align", [1, 4])
def test_every_draw_of_shares_meets_the_budget_within_one_mlp_block(align):
    model, spec = tiny_llama(6, 2, layers=4), SPEC.with_(align=align)
    space = WidthSpace.of(model, spec)
    draw = random.Random(0)
    for _ in range(50):
        counts = space.counts({m: draw.random() for m in space.units})
        removed = removed_by(model, counts, spec.granularity)
        assert space.target <= removed < space.target + max(p for (_i, k), p in space.prices.items() if k == "mlp")
        for (index, kind), n in space.units.items():
            count = counts[index][0] if kind == "attn" else counts[index][1] // align
            assert 0 <= count <= n - space.floors[(index, kind)]
        assert all(c % align == 0 for _a, c in counts.values())


def test_the_shares_of_budget_counts_give_them_back():
    model = tiny_llama(6, 2, layers=4)
    space = WidthSpace.of(model, SPEC)
    counts = allocate(model, CalibrationPasses(calibration(), progress=False).importance(model, SPEC), SPEC)[0]
    assert space.counts(space.shares(counts)) == counts


def test_shares_that_cannot_reach_the_budget_are_one_line():
    model = tiny_llama(6, 2, layers=4)
    space = WidthSpace.of(model, SPEC)
    with pytest.raises(AdaPrunerError, match="cannot remove"):
        space.counts({m: (1.0 if m == (0, "mlp") else 0.0) for m in space.units})
    with pytest.raises(AdaPrunerError, match="--target-params"):
        WidthSpace.of(model, SPEC.with_(target_params=None, ratio=0.2))


def test_assembled_variants_equal_a_fresh_prune_with_the_same_counts():
    model, ids = tiny_llama(6, 2, layers=4), calibration()
    statistics = CalibrationPasses(ids, progress=False)
    variants = LayerVariants(model, SPEC, statistics)
    space = WidthSpace.of(model, SPEC)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    for seed in range(3):
        counts = space.counts({m: random.Random(seed).random() + 0.01 * k for k, m in enumerate(space.units)})
        assembled = copy.deepcopy(model)
        cut(assembled, variants.plan(counts), variants.updates(counts))
        fresh = copy.deepcopy(model)
        plan = plan_from_counts(model, variants.scores, counts, SPEC.granularity)
        cut(fresh, plan, refit_updates(model, plan, statistics, SPEC.compensation, SPEC.damp))
        with torch.no_grad():
            torch.testing.assert_close(assembled(tokens).logits, fresh(tokens).logits, rtol=1e-5, atol=1e-5)
    assert len(variants.refits) <= 3 * len(space.units)  # each (layer, module, count) solved once


def test_a_bounded_variant_store_drops_the_least_recently_used_and_solves_them_again_alike():
    """`variant_store_bytes` allows at least two structures' worth; under a bound of one, the store stays within it
    after every trial, keeps the structure just assembled, and a dropped variant comes back equal to the unbounded
    store's."""
    from adapruner.searching.memory_plan import variant_store_bytes
    from adapruner.searching.widths import structure_bytes

    model, ids = tiny_llama(6, 2, layers=4), calibration()
    statistics = CalibrationPasses(ids, progress=False)
    space = WidthSpace.of(model, SPEC)
    one = structure_bytes(model, range(4))
    assert variant_store_bytes(one, host_available=0) == 2 * one
    assert variant_store_bytes(one, host_available=400 * one) == 100 * one
    bound = one
    assert bound == sum(
        4 * (lin.in_features + 1) * lin.out_features for lin in output_projections(model, range(4)).values()
    )
    bounded, unbounded = (
        LayerVariants(model, SPEC, statistics, store_bytes=bound),
        LayerVariants(model, SPEC, statistics),
    )
    structures = [
        space.counts({m: random.Random(seed).random() + 0.01 * k for k, m in enumerate(space.units)})
        for seed in range(6)
    ]
    for counts in [*structures, *structures]:  # the second round asks again for variants the bound dropped
        got, expected = bounded.updates(counts), unbounded.updates(counts)
        assert bounded.held_bytes <= bound and bounded.held_bytes == sum(
            t.numel() * 4 for update in bounded.refits.values() for pair in update.values() for t in pair
        )
        assert got.keys() == expected.keys()
        for name, (weight, bias) in got.items():
            assert torch.equal(weight, expected[name][0]) and torch.equal(bias, expected[name][1])
    assert len(bounded.refits) < len(unbounded.refits)  # something was dropped


def test_a_greedy_metric_is_refused():
    model = tiny_llama(6, 2, layers=4)
    with pytest.raises(AdaPrunerError, match="use fluct"):
        LayerVariants(model, SPEC.with_(metric="obs"), CalibrationPasses(calibration(), progress=False))
