"""Compensation-aware allocation (issue 22): plans chosen by the OBS greedy meet the budget, the error allocation
takes the least error per parameter first with any metric, and the search's cached path agrees with prune."""

import copy

import pytest
import torch

from adapruner.choosing.allocation import error_counts, target_count
from adapruner.choosing.selection import plan_allocation
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.pruning import PruneOptions, apply_study_plan, prune_model
from adapruner.cutting.removal import plan_removed
from adapruner.errors import AdaPrunerError
from adapruner.model.models import load_model
from adapruner.model.structure import layer_info, mlp_group, output_projections
from adapruner.scoring.cache import CachedImportance, CandidatePool, build_cache, cache_key
from adapruner.scoring.collect import collect_input_moments
from adapruner.scoring.importance import Importance, LinearStats
from tests.helpers import tiny_family, tiny_search


def live_stats(model, tokens):
    moments = collect_input_moments(model, output_projections(model, range(4)), tokens, gram=True, progress=False)
    return {n: LinearStats(act_var=m.variance, act_cov=m.covariance) for n, m in moments.items()}


@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("allocation", ["uniform", "global", "error"])
def test_obs_plans_meet_the_budget(granularity, allocation):
    model = tiny_family("llama")
    tokens = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(0))
    spec = PruneSpec(
        None, target_params=0.15, layers="all", metric="obs", allocation=allocation, granularity=granularity
    )
    importance = Importance("obs", stats=live_stats(model, tokens), damp=spec.obs_damp)
    plan = plan_allocation(model, importance, spec)
    removed, channel = plan_removed(model, plan), 3 * 32  # an MLP channel of the tiny model (gate, up, down)
    assert target_count(model, 0.15) <= removed < target_count(model, 0.15) + channel
    for index, kept in plan.mlp.items():  # the units removed are the greedy's first ones
        n_remove = 24 - len(kept)
        order = [u for step in importance.removal(mlp_group(layer_info(model, index)), n_remove).steps for u in step]
        assert sorted(set(range(24)) - set(kept)) == sorted(order[:n_remove])


def test_error_counts_take_the_least_error_per_parameter_first():
    """Hand-built curves on the tiny model (a query unit — one head of each of 2 kv groups — carries 1024 parameters,
    an MLP channel 96), budget 2880: layer 0's 23 channels go first (1.0e-6 per parameter), layer 0's attention unit
    (9.8e-6) would pass the budget by more than a channel and is passed over, layer 1's channels (1.0e-5) fill the
    rest exactly; layer 1's attention (1e-3) is never touched."""
    model = tiny_family("llama")
    spec = PruneSpec(None, target_params=0.05, layers="0:2", granularity="query")
    curves = {
        (0, "attn"): torch.tensor([0.0, 0.01, 1e9], dtype=torch.float64),
        (0, "mlp"): torch.tensor([1e-4 * k for k in range(24)], dtype=torch.float64),
        (1, "attn"): torch.tensor([0.0, 1.0], dtype=torch.float64),
        (1, "mlp"): torch.tensor([1e-3 * k for k in range(24)], dtype=torch.float64),
    }
    assert error_counts(model, curves, range(0, 2), 2880, spec) == {0: (0, 23), 1: (0, 7)}


@pytest.mark.parametrize("metric", ["l2", "fluct"])
def test_error_allocation_with_any_metric_meets_the_budget_and_follows_the_error(metric):
    model = tiny_family("llama")
    tokens = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(0))
    spec = PruneSpec(None, target_params=0.2, layers="all", metric=metric, allocation="error", granularity="query")
    plan = plan_allocation(model, Importance(metric, stats=live_stats(model, tokens)), spec)
    removed = plan_removed(model, plan)
    assert target_count(model, 0.2) <= removed < target_count(model, 0.2) + 3 * 32
    widths = {len(kept) for kept in plan.mlp.values()}
    assert all(w >= 6 for w in widths)  # min_keep 0.25 of 24 channels


def test_the_cached_obs_plan_is_the_live_one(tmp_path):
    model = tiny_family("qwen3")
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    addresses = [("a", i) for i in range(4)]
    key = cache_key("tiny", model, CandidatePool(["a"], 4, 16, 0), range(4), activations=True, dtype="float32")
    cache = build_cache(model, key, tokens, addresses, progress=False)
    spec = PruneSpec(0.5, layers="all", metric="obs", granularity="query")
    live = plan_allocation(model, Importance("obs", stats=live_stats(model, tokens)), spec)
    cached = plan_allocation(model, CachedImportance(cache, "obs", "sum", torch.arange(4)), spec)
    assert cached == live and live.mlp[0] != list(range(12))


def test_error_allocation_refuses_moe_experts_in_one_line():
    model = tiny_family("mixtral")
    spec = PruneSpec(0.25, layers="all", metric="l2", allocation="error")
    with pytest.raises(AdaPrunerError, match="MoE experts do not keep"):
        plan_allocation(model, Importance("l2"), spec)


def test_a_search_offers_obs_and_the_error_allocation(tmp_path):
    """Trials choose obs and the error allocation from the cache; the plan a trial scored is the one a fresh prune
    of its recipe on its windows gives (fp32 cache), and `apply_study_plan` delivers it."""
    model = tiny_family("llama")
    best = tiny_search(
        tmp_path,
        model,
        spec=PruneSpec(None, target_params=0.15, layers="all", granularity="query"),
        metrics=("obs",),
        allocations=("error",),
        compensations=("lsq",),
        trials=2,
    )
    assert (best.prune_spec.metric, best.prune_spec.allocation) == ("obs", "error")
    loaded, tokenizer = load_model(str(tmp_path / "model"))
    again = prune_model(copy.deepcopy(loaded), tokenizer, PruneOptions.from_best(best), progress=False)
    assert again.plan == best.prune_plan
    assert apply_study_plan(loaded, best, tokenizer, progress=False).plan == best.prune_plan


@pytest.mark.parametrize("align", [1, 4])
def test_error_allocation_by_ratio_and_with_align(align):
    """By ratio, `error` removes what `uniform` would (within one MLP block); with --align, whole blocks."""
    model = tiny_family("llama")
    tokens = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(0))
    stats = live_stats(model, tokens)
    spec = PruneSpec(0.25, layers="all", metric="obs", allocation="error", granularity="query", align=align)
    plan = plan_allocation(model, Importance("obs", stats=stats), spec)
    uniform = plan_allocation(model, Importance("obs", stats=stats), spec.with_(allocation="uniform"))
    assert 0 <= plan_removed(model, plan) - plan_removed(model, uniform) < 3 * 32 * align
    assert all(len(kept) % align == 0 for kept in plan.mlp.values())
