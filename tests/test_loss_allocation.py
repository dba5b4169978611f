"""The `loss` allocation: the output Fisher is the mean per-sample squared output gradient, a loss-weighted removal
costs the refit error weighted by it, the budget holds, and prune, the activation cache and the refit pool agree."""

from dataclasses import replace

import pytest
import torch

from adapruner.choosing.allocation import target_count
from adapruner.choosing.selection import plan_allocation
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.removal import plan_removed
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import layer_info, mlp_group, output_projections
from adapruner.scoring.cache import CachedImportance, CandidatePool, build_cache, cache_key
from adapruner.scoring.collect import collect_input_moments, collect_output_fisher, sample_loss
from adapruner.scoring.importance import Importance, LinearStats
from tests.helpers import tiny_family

DAMP = 0.3
CHANNEL = 3 * 32  # an MLP channel of the tiny model (gate and up rows, down column)


def tokens_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (n, 16), generator=torch.Generator().manual_seed(seed))


def loss_stats(model, tokens) -> dict[str, LinearStats]:
    """What `prune` gives the loss allocation: each output projection's Σ and output Fisher."""
    outputs = output_projections(model, range(4))
    moments = collect_input_moments(model, outputs, tokens, gram=True, progress=False)
    fisher = collect_output_fisher(model, outputs, tokens, progress=False)
    return {n: LinearStats(act_var=m.variance, act_cov=m.covariance, out_fisher=fisher[n]) for n, m in moments.items()}


@pytest.mark.parametrize(
    ("family", "layers"),
    [("llama", range(4)), ("llama", range(2, 4)), ("gemma2", range(1, 4)), ("qwen3_moe", range(4))],
)
def test_output_fisher_is_the_mean_per_sample_squared_output_gradient(family, layers):
    """The layer-by-layer backward (`layer_gradients`, from layer 0 or from the first listed layer up) gives what
    autograd gives through the whole model, sample by sample; sliding windows (gemma2) and experts too."""
    model = tiny_family(family)
    tokens = tokens_of(5)
    outputs = output_projections(model, layers)
    fisher = collect_output_fisher(model, outputs, tokens, progress=False, batch_size=2)  # batches of 2, 2 and 1
    expected = {name: torch.zeros(linear.out_features) for name, linear in outputs.items()}
    for s in range(5):  # one sample at a time: autograd's gradient of L_s with respect to each output
        seen = {}
        hooks = [
            linear.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out))
            for name, linear in outputs.items()
        ]
        loss = sample_loss(model, tokens[s : s + 1]).sum()
        for hook in hooks:
            hook.remove()
        grads = torch.autograd.grad(loss, list(seen.values()))
        for name, grad in zip(seen, grads):
            expected[name] += grad.square().reshape(-1, grad.shape[-1]).sum(0) / 5
    assert fisher.keys() == expected.keys()
    for name in fisher:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-12)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # the model is left as it was
    assert torch.is_grad_enabled()


def test_a_loss_weighted_removal_costs_the_fisher_weighted_refit_error():
    """Removing one down_proj channel u costs Σ_r f_r · min_{w'_r, w'_ru = 0} [mean_t ((w_r − w'_r)·x̃_t)² + λ‖w_r −
    w'_r‖²] (brute force, row by row), and obs removes the channel where that is least."""
    model = tiny_family("llama")
    info = layer_info(model, 0)
    name = f"{info.mlp_prefix}.down_proj"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    centred = x - x.mean(0)
    cov = centred.t() @ centred / 80
    f = torch.rand(32, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, 32, dtype=torch.float64)
    stats = {name: LinearStats(act_cov=cov.float(), out_fisher=f.float())}
    w = info.mlp.down_proj.weight.detach().double()
    lam = DAMP * cov.diagonal().mean()

    def weighted_error(u: int) -> float:
        kept = [c for c in range(24) if c != u]
        design = torch.cat([centred[:, kept] / 80**0.5, lam.sqrt() * torch.eye(24, dtype=torch.float64)[:, kept]])
        target = torch.cat([centred @ w.t() / 80**0.5, lam.sqrt() * w.t()])
        fit = torch.linalg.lstsq(design, target).solution
        return float(((design @ fit - target).square().sum(0) * f).sum())

    removal = Importance("obs", stats=stats, damp=DAMP).removal(mlp_group(info), 1, loss_weighted=True)
    expected = [weighted_error(u) for u in range(24)]
    assert removal.steps == [[min(range(24), key=expected.__getitem__)]]
    assert removal.costs[0] == pytest.approx(min(expected), rel=1e-4)
    unweighted = Importance("obs", stats=stats, damp=DAMP).removal(mlp_group(info), 1)
    assert unweighted.costs[0] != pytest.approx(removal.costs[0], rel=1e-2)


@pytest.mark.parametrize("metric", ["obs", "fluct"])
def test_the_loss_allocation_meets_the_budget_and_spares_what_the_loss_feels(metric):
    model = tiny_family("llama")
    stats = loss_stats(model, tokens_of(6))
    spec = PruneSpec(None, target_params=0.2, layers="all", metric=metric, allocation="loss", granularity="query")
    plan = plan_allocation(model, Importance(metric, stats=stats), spec)
    target = target_count(model, 0.2)
    assert target <= plan_removed(model, plan) < target + CHANNEL
    scaled = {n: replace(s, out_fisher=7 * s.out_fisher) for n, s in stats.items()}
    assert plan_allocation(model, Importance(metric, stats=scaled), spec) == plan  # only ratios of f matter
    loud = output_projections(model, [1])
    felt = {n: replace(s, out_fisher=(100 if n in loud else 1) * s.out_fisher) for n, s in stats.items()}
    spared = plan_allocation(model, Importance(metric, stats=felt), spec)

    def layer_1_keeps(p) -> tuple[int, int]:
        return len(p.attention[1][0]) if 1 in p.attention else 4, len(p.mlp.get(1, range(24)))

    assert layer_1_keeps(spared) >= layer_1_keeps(plan) and layer_1_keeps(spared) != layer_1_keeps(plan)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_the_factorised_curves_are_the_rank_update_curves_and_give_the_same_plans(model_type, dtype, rtol, monkeypatch):
    """In a fixed order (fluct's), the loss allocation's removal curves from one factorisation per module equal the
    step-by-step fp64 rank updates' (1e-6 relative in fp64; 1e-5 in fp32, what the allocation runs), and so do its
    plans at every budget."""
    import functools

    import adapruner.scoring.importance as importance
    from adapruner.choosing.selection import error_removals, removal_curves, score_layers
    from adapruner.scoring.obs import ordered_removal, ordered_removal_by_updates

    monkeypatch.setattr(importance, "ordered_removal", functools.partial(ordered_removal, dtype=dtype))

    model = tiny_family(model_type)
    fluct = Importance("fluct", stats=loss_stats(model, tokens_of(6)))
    every = {index: (True, True) for index in range(4)}
    spec = PruneSpec(None, 0.2, layers="all", metric="fluct", allocation="loss", granularity="query", min_keep=0.0)
    scores = score_layers(model, fluct, every, "query")

    def curves_and_plans():
        curves = removal_curves(error_removals(model, fluct, every, spec, scores))
        plans = [plan_allocation(model, fluct, spec.with_(target_params=t)) for t in (0.1, 0.2, 0.3, 0.4)]
        return curves, plans

    factorised, plans = curves_and_plans()
    monkeypatch.setattr(importance, "ordered_removal", ordered_removal_by_updates)
    updated, updated_plans = curves_and_plans()
    assert plans == updated_plans
    for key, curve in updated.items():
        torch.testing.assert_close(factorised[key], curve, rtol=rtol, atol=1e-12)


def test_the_cached_loss_plan_is_the_live_one():
    """A search trial's output Fisher from the cached dY rows of its samples is the live one over those windows."""
    model = tiny_family("qwen3")
    tokens = tokens_of(4, seed=2)
    key = cache_key("tiny", model, CandidatePool(["a"], 4, 16, 0), range(4), activations=True, dtype="float32")
    cache = build_cache(model, key, tokens, [("a", i) for i in range(4)], progress=False)
    samples = torch.tensor([0, 2, 3])
    live = collect_output_fisher(model, output_projections(model, range(4)), tokens[samples], progress=False)
    for name, fisher in live.items():
        torch.testing.assert_close(cache.output_fisher(name, samples, "cpu"), fisher, rtol=1e-4, atol=1e-12)
    spec = PruneSpec(None, target_params=0.15, layers="all", metric="obs", allocation="loss", granularity="query")
    cached = plan_allocation(model, CachedImportance(cache, "obs", "sum", samples), spec)
    assert cached == plan_allocation(model, Importance("obs", stats=loss_stats(model, tokens[samples])), spec)


def test_the_loss_allocation_without_an_output_fisher_is_one_line():
    model = tiny_family("llama")
    stats = {n: LinearStats(act_cov=s.act_cov) for n, s in loss_stats(model, tokens_of(4)).items()}
    spec = PruneSpec(0.25, layers="all", metric="l2", allocation="loss")
    with pytest.raises(AdaPrunerError, match="needs the output Fisher"):
        plan_allocation(model, Importance("l2", stats=stats), spec)
