"""The (1+λ) width evolution (issue 33): every child meets the budget within one MLP block and its floors, a step
moves an attention unit's worth of parameters, the parent never gets worse, multi-step selection scores each chunk of
windows once per structure and only the survivors on later chunks, and on a separable objective it moves toward the
optimum; on a tiny model it lowers the validation KL of the loss counts."""

import random

import pytest
import torch

from adapruner.choosing.allocation import removed_by
from adapruner.choosing.selection import allocate
from adapruner.choosing.spec import PruneSpec
from adapruner.errors import AdaPrunerError
from adapruner.scoring.sources import CalibrationPasses
from adapruner.searching.evolution import Schedule, Stages, evolve, mutated, step_of
from adapruner.searching.trial_scorer import ValidationScorer
from adapruner.searching.widths import LayerVariants, WidthSpace
from tests.models import tiny_llama

SPEC = PruneSpec(None, target_params=0.2, metric="fluct", allocation="loss", compensation="lsq", granularity="query")


def space_and_start(model, spec=SPEC):
    space = WidthSpace.of(model, spec)
    start = space.counts({m: 1.0 for m in space.units})
    return space, start


def test_every_child_meets_the_budget_and_its_floors():
    model = tiny_llama(6, 2, layers=4)
    space, start = space_and_start(model)
    block = max(p for (_i, kind), p in space.prices.items() if kind == "mlp")
    draw, units = random.Random(0), space.module_counts(start)
    for _ in range(40):
        units = mutated(space, units, draw.randint(1, 4), draw)
        assert space.target <= space.removed(units) < space.target + block
        assert space.removed(units) == removed_by(model, space.layer_counts(units), "query")
        assert all(0 <= units[m] <= space.units[m] - space.floors[m] for m in space.units)


def test_an_mlp_step_is_worth_one_attention_unit_of_its_layer():
    model = tiny_llama(6, 2, layers=4)
    space, _start = space_and_start(model)
    # a query unit: one query head of each of 2 kv groups, 2 · (8 · 48 q rows + 48 · 8 o columns) = 1536 parameters;
    # an MLP channel: 3 · 48 = 144 → 1536 / 144 = 10.7 → 11 channels
    assert space.prices[(0, "attn")] == 1536 and step_of(space, (0, "attn")) == 1
    assert step_of(space, (0, "mlp")) == 11
    mlp_only = WidthSpace.of(model, SPEC.with_(prune_attention=False))
    assert step_of(mlp_only, (0, "mlp")) == 24 // 8


def test_selection_keeps_the_parent_unless_a_child_beats_it_and_scores_each_chunk_once():
    model = tiny_llama(6, 2, layers=4)
    space, start = space_and_start(model)
    optimum = {m: space.units[m] // 2 for m in space.units}
    calls = []

    def score(counts, chunk):  # a separable objective, the same on every chunk
        calls.append(chunk)
        units = space.module_counts(counts)
        return float(sum((units[m] - optimum[m]) ** 2 * space.prices[m] for m in space.units))

    stages = Stages((4, 12, 20), (3, 1))
    result = evolve(space, start, score, stages, Schedule(generations=6, children=5, seed=1), progress=None)
    assert all(b <= a for a, b in zip(result.history, result.history[1:]))
    assert result.history[-1] < result.history[0]
    assert score(result.best, 0) == result.history[-1]
    assert result.children == 30
    # per generation: 5 children on chunk 0, at most 3 on chunk 1, at most 1 on chunk 2; the parent once on each
    assert calls.count(0) <= 1 + 30 and calls.count(1) <= 1 + 18 and calls.count(2) <= 1 + 6
    assert calls.count(2) < calls.count(1) < calls.count(0)


def test_stages_are_checked():
    with pytest.raises(AdaPrunerError, match="must grow"):
        Stages((16, 8), (1,))
    with pytest.raises(AdaPrunerError, match="one survivor count"):
        Stages((16, 64), ())


def test_on_a_tiny_model_the_search_lowers_the_validation_kl_of_the_loss_counts():
    model = tiny_llama(6, 2, layers=4)
    ids = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(3))
    statistics = CalibrationPasses(ids, progress=None)
    space = WidthSpace.of(model, SPEC)
    variants = LayerVariants(model, SPEC, statistics)
    loss = allocate(model, statistics.importance(model, SPEC), SPEC)[0]
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(4))
    stages = Stages((2, 6), (2,))
    scorers = [ValidationScorer(model, windows[a:b], 0, batch_size=4) for a, b in stages.chunks]

    def score(counts, chunk):
        return scorers[chunk].kl(variants.plan(counts), variants.updates(counts))

    result = evolve(space, loss, score, stages, Schedule(generations=4, children=4), progress=None)
    whole = ValidationScorer(model, windows, 0, batch_size=4)
    assert abs(whole.kl(variants.plan(loss), variants.updates(loss)) - result.history[0]) < 1e-6
    found = whole.kl(variants.plan(result.best), variants.updates(result.best))
    assert abs(found - result.history[-1]) < 1e-6 and found < result.history[0]
    assert space.target <= removed_by(model, result.best, "query")
