"""Compensation-aware selection (issue 22): the structured OBS cost is the exact refit error, the batched greedy is the
one-by-one greedy at batch 1, the error allocation meets its budget, and the search's cached path agrees with prune."""

import copy

import pytest
import torch

from adapruner.choosing.allocation import error_counts, target_count
from adapruner.choosing.selection import plan_allocation, scoreless_counts, top_units
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.pruning import PruneOptions, apply_study_plan, prune_model
from adapruner.cutting.removal import plan_removed
from adapruner.cutting.sequential import check_sequential, prune_sequential
from adapruner.data.calibration import windows_at
from adapruner.errors import AdaPrunerError
from adapruner.model.models import load_model
from adapruner.model.structure import head_channels, layer_info, mlp_group, output_projections
from adapruner.scoring.cache import CachedImportance, CandidatePool, build_cache, cache_key
from adapruner.scoring.importance import Importance, LinearStats
from adapruner.scoring.obs import greedy_removal, inverse_hessian, unit_costs
from adapruner.scoring.statistics import collect_input_moments
from tests.helpers import byte_level_tokenizer, one_error_line, run_cli, tiny_family, tiny_search

DAMP = 0.3


def layer_case(block: int, units: int = 6, tokens: int = 60, seed: int = 0):
    """A tiny output linear (5 × units·block) with correlated, off-centre inputs, and the brute-force refit error."""
    g = torch.Generator().manual_seed(seed)
    width = units * block
    x = (
        torch.randn(tokens, width, generator=g, dtype=torch.float64)
        @ torch.randn(width, width, generator=g, dtype=torch.float64)
        + 0.5
    )
    w = torch.randn(5, width, generator=g, dtype=torch.float64)
    centred = x - x.mean(0)
    cov = centred.t() @ centred / tokens
    lam = DAMP * cov.diagonal().mean()

    def refit_error(removed: list[int]) -> float:
        """min over W' with W'_B = 0 of mean_t ‖(W − W') x̃_t‖² + λ‖W − W'‖², by least squares on the stacked data."""
        gone = {u * block + k for u in removed for k in range(block)}
        kept = [c for c in range(width) if c not in gone]
        design = torch.cat(
            [centred[:, kept] / tokens**0.5, lam.sqrt() * torch.eye(width, dtype=torch.float64)[:, kept]]
        )
        target = torch.cat([centred @ w.t() / tokens**0.5, lam.sqrt() * w.t()])
        fit = torch.linalg.lstsq(design, target).solution
        return float((design @ fit - target).square().sum())

    return w, cov, refit_error


@pytest.mark.parametrize("block", [1, 3])
def test_one_unit_cost_is_the_refit_error_without_it(block):
    w, cov, refit_error = layer_case(block)
    costs = unit_costs(w, inverse_hessian(cov, DAMP), block)
    expected = torch.tensor([refit_error([u]) for u in range(6)], dtype=torch.float64)
    torch.testing.assert_close(costs, expected, rtol=1e-7, atol=1e-9)


def brute_greedy(refit_error, units: int, steps: int, groups: int = 1) -> list[list[int]]:
    """Remove, each step, the unit (one per group) whose removal adds the least exact refit error."""
    removed: list[int] = []
    order = []
    size = units // groups
    for _ in range(steps):
        base = refit_error(removed)
        chosen = []
        for g in range(groups):
            alive = [u for u in range(g * size, (g + 1) * size) if u not in removed]
            chosen.append(min(alive, key=lambda u: refit_error(removed + [u]) - base))
        removed += chosen
        order.append(chosen)
    return order


@pytest.mark.parametrize("block,groups", [(1, 1), (2, 1), (2, 2)])
def test_batch_one_greedy_is_the_one_by_one_greedy(block, groups):
    w, cov, refit_error = layer_case(block, units=6)
    steps = 4 if groups == 1 else 2
    removal = greedy_removal(w, inverse_hessian(cov, DAMP), block, steps, batch=1, groups=groups)
    assert removal.steps == brute_greedy(refit_error, 6, steps, groups)
    removed = [u for step in removal.steps for u in step]
    assert sum(removal.costs) == pytest.approx(refit_error(removed), rel=1e-7)  # step costs add up to the set's
    assert all(c >= 0 for c in removal.costs)


def test_batched_greedy_costs_add_up_and_a_priority_orders_it():
    w, cov, refit_error = layer_case(1, units=12)
    hinv = inverse_hessian(cov, DAMP)
    removal = greedy_removal(w, hinv, 1, 7, batch=3)
    assert [len(s) for s in removal.steps] == [3, 3, 1]
    assert sum(removal.costs) == pytest.approx(refit_error([u for s in removal.steps for u in s]), rel=1e-7)
    priority = torch.arange(12, 0, -1).double()  # another metric's order: highest index first
    ordered = greedy_removal(w, hinv, 1, 4, priority=priority)
    assert ordered.steps == [[11], [10], [9], [8]]
    assert sum(ordered.costs) == pytest.approx(refit_error([8, 9, 10, 11]), rel=1e-7)
    ranks = ordered.ranks()
    assert ranks[11] == 0 and ranks[8] == 3 and ranks[0] == 12  # kept units rank above every removed one


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


def test_obs_removes_redundant_channels_whatever_their_weight():
    """Channels 5 and 17 copy channels 2 and 9 and carry the largest down_proj weights (l2 keeps them): the refit
    moves a copy's weight onto its original, so obs removes one channel of each pair, at almost no cost."""
    model = tiny_family("llama")
    info = layer_info(model, 0)
    x = torch.randn(400, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:, 5], x[:, 17] = x[:, 2], x[:, 9]
    with torch.no_grad():
        info.mlp.down_proj.weight[:, [5, 17]] *= 10
    stats = {f"{info.mlp_prefix}.down_proj": LinearStats(act_cov=torch.cov(x.t(), correction=0).float())}
    removal = Importance("obs", stats=stats, damp=1e-6).removal(mlp_group(info), 2)
    removed = {u for step in removal.steps for u in step}
    assert len(removed & {2, 5}) == 1 and len(removed & {9, 17}) == 1
    alone = Importance("obs", stats=stats, damp=1e-6)(mlp_group(info))
    assert sum(removal.costs) < 1e-3 * alone.median()
    assert set(Importance("l2")(mlp_group(info)).topk(2).indices.tolist()) == {5, 17}


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_sequential_statistics_are_a_fresh_pass_through_the_pruned_layers(model_type):
    """Each output projection is chosen and refit from the moments a fresh pass of the final pruned model gives at its
    kept inputs: the layers before it are already pruned and compensated (Gemma-3: per-layer masks and rotary)."""
    model = tiny_family(model_type)
    tokens = torch.randint(0, 97, (10, 16), generator=torch.Generator().manual_seed(4))
    spec = PruneSpec(0.5, layers="all", metric="obs", granularity="query", compensation="lsq", sequential=True)
    seen = {}
    plan, refit = prune_sequential(
        model, tokens, spec, {i: (1, 12) for i in range(4)}, observe=seen.__setitem__, progress=False
    )
    fresh = collect_input_moments(model, output_projections(model, range(4)), tokens, gram=True, progress=False)
    assert set(seen) == set(fresh) and sorted(refit) == sorted(fresh)
    for name, moments in seen.items():
        index = int(name.split(".layers.")[1].split(".")[0])
        if name.endswith("o_proj"):
            kept = head_channels(plan.attention[index][0], layer_info(model, index).head_dim)
        else:
            kept = torch.tensor(plan.mlp[index])
        torch.testing.assert_close(moments.mean[kept], fresh[name].mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(moments.gram[kept][:, kept], fresh[name].gram, atol=1e-5, rtol=1e-4)
    dense = tiny_family(model_type)
    first = collect_input_moments(dense, output_projections(dense, [3]), tokens, progress=False)
    down = next(n for n in seen if n.endswith("3.mlp.down_proj"))
    assert not torch.allclose(seen[down].mean, first[down].mean, rtol=1e-2, atol=0)  # not the dense statistics


def test_sequential_refuses_gradient_metrics_in_one_line():
    with pytest.raises(AdaPrunerError, match="needs the whole model's gradients"):
        check_sequential(PruneSpec(0.25, metric="taylor1", sequential=True))


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "--model", "smollm2", "--sequential", "--metric", "taylor1", "--no-eval"],
        ["search", "--sequential", "--metrics", "obs,taylor2"],
        ["run", "--sequential", "--metrics", "vector"],
    ],
)
def test_sequential_with_a_gradient_metric_is_refused_before_loading(argv, capsys, tmp_path):
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and one_error_line(err, "needs the whole model's gradients")
    assert list(tmp_path.iterdir()) == []


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


def test_a_sequential_study_applies_its_best_recipe_layer_by_layer(tmp_path):
    model = tiny_family("llama")
    best = tiny_search(
        tmp_path, model, spec=PruneSpec(0.5, layers="all", sequential=True), metrics=("obs", "act"), trials=2
    )
    loaded, tokenizer = load_model(str(tmp_path / "model"))
    applied = apply_study_plan(copy.deepcopy(loaded), best, tokenizer, progress=False)
    windows = windows_at(tokenizer, [tuple(a) for a in best.addresses], best.seq_len).input_ids
    counts = scoreless_counts(loaded, best.prune_spec, range(4))
    plan, _ = prune_sequential(loaded, windows, best.prune_spec, counts, progress=False)
    assert best.prune_spec.sequential and applied.plan == plan


def test_batched_ranks_drop_exactly_the_first_units_removed():
    w, cov, _ = layer_case(1, units=12)
    removal = greedy_removal(w, inverse_hessian(cov, DAMP), 1, 10, batch=4)
    order = [u for step in removal.steps for u in step]
    ranks = removal.ranks()
    for n_remove in (3, 5, 10):  # mid-step counts too: a step's units in the order of their costs
        assert sorted(set(range(12)) - set(top_units(ranks, 12 - n_remove))) == sorted(order[:n_remove])


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


def test_a_spec_saved_before_the_new_fields_reads_with_their_defaults():
    old = {k: v for k, v in PruneSpec(0.3, metric="act").to_dict().items() if k not in ("obs_damp", "sequential")}
    assert PruneSpec.from_dict(old) == PruneSpec(0.3, metric="act")
    with pytest.raises(AdaPrunerError, match="holds only the fields"):
        PruneSpec.from_dict({**old, "magic": 1})


def test_sequential_refuses_moe_experts_in_one_line():
    model = tiny_family("mixtral")
    options = PruneOptions(PruneSpec(0.25, layers="all", metric="l2", sequential=True), calib="news:2")
    with pytest.raises(AdaPrunerError, match="--sequential reads each layer's linears"):
        prune_model(model, byte_level_tokenizer(), options, progress=False)


def test_a_slightly_indefinite_covariance_is_projected_onto_the_psd_cone():
    """Σ = C − μμᵀ in fp32 can lose its PSD-ness to cancellation: the inverse is that of the nearest PSD Σ, damped."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    cov = x.t() @ x / 4 - 1e-3 * torch.eye(6, dtype=torch.float64)  # rank 4 less a little: two negative eigenvalues
    damp = 1e-6
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(cov + damp * cov.diagonal().mean() * torch.eye(6, dtype=torch.float64))
    values, vectors = torch.linalg.eigh(cov)
    nearest = vectors @ torch.diag(values.clamp_min(0)) @ vectors.t()
    lam = damp * cov.diagonal().mean()
    expected = torch.linalg.inv(nearest + lam * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(inverse_hessian(cov, damp), expected)
