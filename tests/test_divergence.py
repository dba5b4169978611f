"""KL divergence on the dense top k: 0 for the dense model, the full KL at k = vocabulary, a lower bound below it, and
the trial scorer's prefix-cached KL equal to a full forward's."""

import copy

import pytest
import torch
import torch.nn.functional as F

from adapruner.choosing.selection import plan_pruning
from adapruner.cutting.removal import cut
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.divergence import dense_top_k, mean_kl, window_divergences
from adapruner.evaluation.evaluate import perplexity
from adapruner.scoring.importance import Importance
from adapruner.searching.trial_scorer import ValidationScorer
from tests.models import tiny_llama

WINDOWS = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(2))


def pruned_copy_of(model):
    pruned = copy.deepcopy(model)
    plan = plan_pruning(model, Importance("l2"), 0.5, range(1, 3), "kv")
    cut(pruned, plan)
    return pruned, plan


def full_kl(dense, pruned) -> float:
    """Mean over positions of KL(p || q) over the whole vocabulary, by torch."""
    with torch.no_grad():
        log_p = torch.log_softmax(dense(WINDOWS).logits.float(), -1)
        log_q = torch.log_softmax(pruned(WINDOWS).logits.float(), -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean().item()


def test_the_dense_model_is_at_zero_and_a_pruned_one_above():
    dense = tiny_llama(6, 2, layers=3)
    top = dense_top_k(dense, WINDOWS, k=8, batch_size=2)
    assert abs(mean_kl(dense, WINDOWS, top, batch_size=3)) < 1e-6
    pruned, _plan = pruned_copy_of(dense)
    assert mean_kl(pruned, WINDOWS, top) > 1e-4


def test_the_whole_vocabulary_gives_the_full_kl_and_a_top_k_a_lower_bound():
    dense = tiny_llama(6, 2, layers=3)
    pruned, _plan = pruned_copy_of(dense)
    exact = full_kl(dense, pruned)
    assert abs(mean_kl(pruned, WINDOWS, dense_top_k(dense, WINDOWS, k=97)) - exact) < 1e-5 * max(1.0, exact)
    for k in (1, 4, 16):
        assert 0.0 <= mean_kl(pruned, WINDOWS, dense_top_k(dense, WINDOWS, k=k)) <= exact + 1e-6


def test_the_trial_scorer_s_kl_from_the_cached_prefix_equals_a_full_forward():
    dense = tiny_llama(6, 2, layers=3)
    pruned, plan = pruned_copy_of(dense)
    scorer = ValidationScorer(dense, WINDOWS, start=1, batch_size=2)
    expected = mean_kl(pruned, WINDOWS, dense_top_k(dense, WINDOWS, batch_size=4))
    assert abs(scorer.kl(plan) - expected) < 1e-5
    assert abs(scorer.kl(type(plan)())) < 1e-6  # the dense structure: KL 0


def test_the_kl_refuses_a_plan_that_prunes_a_layer_inside_the_cached_prefix():
    dense = tiny_llama(6, 2, layers=3)
    plan = plan_pruning(dense, Importance("l2"), 0.5, range(0, 3), "kv")
    with pytest.raises(AdaPrunerError, match="before 1"):
        ValidationScorer(dense, WINDOWS, start=1, batch_size=2).kl(plan)


def test_per_window_divergences_average_to_the_kl_and_give_the_perplexity():
    dense = tiny_llama(6, 2, layers=3)
    pruned, _plan = pruned_copy_of(dense)
    top = dense_top_k(dense, WINDOWS, k=16)
    kls, nlls = window_divergences(pruned, WINDOWS, top, batch_size=2)
    assert kls.shape == nlls.shape == (5,)
    assert abs(kls.mean().item() - mean_kl(pruned, WINDOWS, top, batch_size=5)) < 1e-6
    for rows in (slice(0, 5), slice(1, 3)):
        expected = perplexity(pruned, WINDOWS[rows], progress=False)
        assert abs(nlls[rows].mean().exp().item() - expected) < 1e-5 * expected
