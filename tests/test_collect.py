"""Calibration statistics against independent autograd: G = Σ_s g_s, F = mean_s g_s², a = ‖x‖₂ per input."""

import torch

from adapruner.model.structure import prunable_linears
from adapruner.scoring.collect import collect_stats, sample_loss


def per_sample_grads(model, batch, weights):
    """g_s for each sample s from HF's own loss (labels = inputs), one autograd.grad per sample."""
    grads = []
    for row in batch:
        loss = model(input_ids=row[None], labels=row[None]).loss
        grads.append(torch.autograd.grad(loss, weights))
    return grads


def test_grad_and_fisher_match_per_sample_autograd(gqa_model, token_batch):
    linears = prunable_linears(gqa_model, range(1, 3))
    stats = collect_stats(gqa_model, linears, token_batch, frozenset({"grad", "fisher"}), progress=False)
    names = list(linears)
    per_sample = per_sample_grads(gqa_model, token_batch, [linears[n].weight for n in names])
    for k, name in enumerate(names):
        g = torch.stack([sample[k] for sample in per_sample])
        torch.testing.assert_close(stats[name].grad, g.sum(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats[name].fisher, g.square().mean(0), rtol=1e-4, atol=1e-8)
    assert all(p.grad is None for p in gqa_model.parameters())
    assert all(p.requires_grad for p in gqa_model.parameters())


def test_only_requested_statistics_are_kept(mha_model, token_batch):
    linears = prunable_linears(mha_model, range(0, 1))
    stats = collect_stats(mha_model, linears, token_batch, frozenset({"fisher"}), progress=False)
    assert all(s.grad is None and s.fisher is not None and s.act_norm is None for s in stats.values())


def test_act_norm_is_input_feature_norm(mha_model, token_batch):
    linears = prunable_linears(mha_model, range(1, 2))
    name = "model.layers.1.mlp.down_proj"
    seen = []
    handle = linears[name].register_forward_hook(
        lambda _m, inputs, _o: seen.append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))
    )
    stats = collect_stats(mha_model, linears, token_batch, frozenset({"act_norm"}), progress=False)
    handle.remove()
    torch.testing.assert_close(stats[name].act_norm, torch.cat(seen).norm(dim=0))


def test_sample_loss_equals_hf_loss(mha_model, token_batch):
    with torch.no_grad():
        ours = sample_loss(mha_model, token_batch)
        theirs = torch.stack([mha_model(input_ids=r[None], labels=r[None]).loss for r in token_batch])
    torch.testing.assert_close(ours, theirs)


def test_batched_gradient_equals_the_sum_of_per_sample_gradients(gqa_model, token_batch):
    """Without F the samples run in batches (here 2 + 1): the summed loss's gradient is still Σ_s g_s."""
    linears = prunable_linears(gqa_model, range(0, 2))
    stats = collect_stats(gqa_model, linears, token_batch, frozenset({"grad"}), progress=False, batch_size=2)
    names = list(linears)
    per_sample = per_sample_grads(gqa_model, token_batch, [linears[n].weight for n in names])
    for k, name in enumerate(names):
        torch.testing.assert_close(
            stats[name].grad, torch.stack([sample[k] for sample in per_sample]).sum(0), rtol=1e-4, atol=1e-6
        )
