"""Compensation after removal: the bias keeps the output mean, lsq is least squares, compensated models save and
reload, and the cache gives any subset's input moments as a fresh pass does (issue 12)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapruner.choosing.selection import plan_allocation
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.compensation import compensated, compensation_updates, install, output_inputs
from adapruner.cutting.removal import apply_plan
from adapruner.model.structure import prunable_linears
from adapruner.output.saving import save_pruned
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key
from adapruner.scoring.collect import collect_input_moments
from adapruner.scoring.importance import Importance, InputMoments, LinearStats
from adapruner.scoring.sources import CalibrationPasses

SEQ = 9


def moments_of(x: torch.Tensor) -> InputMoments:
    return InputMoments(x.mean(0), x.square().mean(0), x.t() @ x / x.shape[0])


def layer_inputs(device, tokens=4000, width=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g)
    x = (torch.randn(tokens, width, generator=g) @ mix + torch.randn(width, generator=g)).to(
        device
    )  # correlated, non-zero mean
    w = torch.randn(5, width, generator=g).to(device)
    b = torch.randn(5, generator=g).to(device)
    return x, w, b


def test_bias_compensation_keeps_the_mean_output(device):
    x, w, b = layer_inputs(device)
    kept = torch.tensor([0, 2, 3, 7, 8, 11], device=device)
    w_kept, b_new = compensated(w, b, kept, moments_of(x), "bias")
    dense, pruned = x @ w.t() + b, x[:, kept] @ w_kept.t() + b_new
    assert torch.equal(w_kept, w[:, kept])
    torch.testing.assert_close((dense - pruned).mean(0), torch.zeros(5, device=device), atol=1e-4, rtol=0)
    uncompensated = x[:, kept] @ w[:, kept].t() + b
    assert (dense - uncompensated).mean(0).abs().max() > 0.1  # the case is not trivial


def test_lsq_with_vanishing_damping_is_least_squares_with_an_intercept(device):
    x, w, b = layer_inputs(device, tokens=5000)
    kept = torch.tensor([1, 2, 4, 5, 6, 9, 10], device=device)
    w_kept, b_new = compensated(w.double(), b.double(), kept, moments_of(x.double()), "lsq", damp=1e-9)
    design = torch.cat([x[:, kept], torch.ones(x.shape[0], 1, device=device)], 1).double().cpu()
    solution = torch.linalg.lstsq(design, (x @ w.t() + b).double().cpu()).solution  # (K + 1) × out
    torch.testing.assert_close(w_kept.cpu().double(), solution[:-1].t(), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(b_new.cpu().double(), solution[-1], atol=2e-4, rtol=1e-4)
    # damping pulls the kept columns toward the trained ones, and a strong damping nearly returns them
    w_damped, _ = compensated(w, b, kept, moments_of(x), "lsq", damp=1e4)
    torch.testing.assert_close(w_damped, w[:, kept], atol=2e-3, rtol=0)


def test_lsq_solves_a_covariance_that_cancellation_made_indefinite(device):
    """Σ = C − μμᵀ formed in fp32 can come out indefinite where the inputs' spread is below fp32's resolution of
    their mean: the damped Σ_KK then has no Cholesky factor, and the refit is the general solve's (its formula)."""
    _x, w, b = layer_inputs(device)
    mean = torch.full((12,), 2.0, device=device)
    spread = torch.diag(torch.linspace(-1.0, 1.0, 12, device=device))  # an indefinite Σ, as cancellation leaves it
    moments = InputMoments(mean, mean.square(), spread + torch.outer(mean, mean))
    kept = torch.tensor([0, 1, 2, 9, 10, 11], device=device)
    w_kept, b_new = compensated(w, b, kept, moments, "lsq", damp=0.3)
    cov = moments.covariance
    damped = cov[kept][:, kept] + 0.3 * cov[kept][:, kept].diagonal().mean() * torch.eye(6, device=device)
    assert torch.linalg.cholesky_ex(damped).info != 0
    expected = torch.linalg.solve(
        damped, (w @ cov[:, kept] + 0.3 * cov[kept][:, kept].diagonal().mean() * w[:, kept]).t()
    ).t()
    torch.testing.assert_close(w_kept, expected)
    torch.testing.assert_close(b_new, b + w @ mean - expected @ mean[kept])


def test_lsq_beats_bias_beats_nothing_on_the_calibration_tokens(device):
    x, w, b = layer_inputs(device, seed=3)
    kept = torch.tensor([0, 1, 5, 6, 7, 10], device=device)
    dense = x @ w.t() + b
    errors = {}
    for mode in ("none", "bias", "lsq"):
        w_kept, b_new = compensated(w, b, kept, moments_of(x), mode, damp=0.01)
        errors[mode] = (dense - x[:, kept] @ w_kept.t() - b_new).square().mean().item()
    assert errors["lsq"] < errors["bias"] < errors["none"]


def calibration_ids(n=6):
    return torch.randint(0, 97, (n, SEQ), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("mode", ["bias", "lsq"])
def test_compensated_model_saves_and_reloads(mode, gqa_model, tokenizer, tmp_path):
    model, ids = gqa_model, calibration_ids()
    plan = plan_allocation(model, Importance("l2"), PruneSpec(0.5, layers="0:3"))
    moments = collect_input_moments(model, output_inputs(model, plan), ids, gram=True, progress=False)
    updates = compensation_updates(model, plan, moments.__getitem__, mode)
    assert set(updates) == {f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.o_proj", "mlp.down_proj")}
    apply_plan(model, plan)
    install(model, updates)
    save_pruned(model, tokenizer, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    assert reloaded.model.layers[1].mlp.down_proj.bias is not None
    with torch.no_grad():
        delta = (model(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max()
    assert delta < 1e-4


def test_cached_moments_of_any_subset_equal_a_fresh_pass(gqa_model):
    model, ids = gqa_model, calibration_ids(8)
    key = cache_key("tiny", model, CandidatePool(["a"], 8, SEQ, 0), range(0, 3), activations=True, dtype="float32")
    cache = build_cache(model, key, ids, [("a", i) for i in range(8)], progress=False)
    linears = {n: lin for n, lin in prunable_linears(model, range(0, 3)).items() if n.endswith(("o_proj", "down_proj"))}
    for subset in ([3], [0, 5, 6], list(range(8))):
        fresh = collect_input_moments(model, linears, ids[subset], gram=True, progress=False)
        for name in linears:
            cached = cache.input_moments(name, torch.tensor(subset), "cpu", gram=True)
            for field in ("mean", "square_mean", "gram"):
                torch.testing.assert_close(getattr(cached, field), getattr(fresh[name], field), atol=1e-5, rtol=1e-4)
            # and FLAP's fluctuation metric reads the same variance from either
            weight = linears[name].weight
            stats = {name: LinearStats(act_var=fresh[name].variance)}
            torch.testing.assert_close(
                cache.channel_scores("fluct", name, weight.detach(), 1, torch.tensor(subset)),
                Importance("fluct", stats=stats).channel_scores(_member(name, linears[name])),
                atol=1e-6,
                rtol=1e-4,
            )


def _member(name, linear):
    from adapruner.model.structure import Member

    return Member(name, linear, 1, 1)


def test_lsq_grams_in_passes_under_a_budget_equal_one_pass(gqa_model, monkeypatch):
    """A Gram budget of one o_proj Gram (48² fp32) makes one pass per output linear; the refit is the one-pass refit."""
    import adapruner.cutting.compensation as pruner
    import adapruner.scoring.sources as sources

    model, ids = gqa_model, calibration_ids()
    plan = plan_allocation(model, Importance("l2"), PruneSpec(0.5, layers="0:3"))
    targets = output_inputs(model, plan)
    assert [list(c) for c in pruner.gram_chunks(targets, 4 * 48**2 + 4 * 24**2)] == [
        list(targets)[i : i + 2] for i in (0, 2, 4)
    ]
    assert len(pruner.gram_chunks(targets, None)) == 1
    whole = pruner.refit_updates(model, plan, CalibrationPasses(ids, progress=False), "lsq", 1.0, gram_bytes=None)
    passes = []
    real = sources.collect_input_moments
    monkeypatch.setattr(sources, "collect_input_moments", lambda *a, **k: passes.append(list(a[1])) or real(*a, **k))
    split = pruner.refit_updates(model, plan, CalibrationPasses(ids, progress=False), "lsq", 1.0, gram_bytes=4 * 48**2)
    assert passes == [[name] for name in targets]  # one linear's Gram per pass
    assert split.keys() == whole.keys()
    for name, (weight, bias) in whole.items():
        torch.testing.assert_close(split[name][0], weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(split[name][1], bias, rtol=1e-6, atol=1e-7)
