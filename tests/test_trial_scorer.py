"""The trial scorer: prefix hidden states, shared-tensor copies and the validation dtype give the same perplexity."""

import pytest
import torch

from adapruner.choosing.selection import plan_pruning
from adapruner.cutting.removal import apply_plan
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.evaluate import perplexity
from adapruner.kernels.dispatch import native_bf16
from adapruner.scoring.importance import Importance
from adapruner.searching.trial_scorer import ValidationScorer, resolve_val_dtype, shared_copy

SEQ = 11


def windows(n: int = 5) -> torch.Tensor:
    return torch.randint(0, 97, (n, SEQ), generator=torch.Generator().manual_seed(3))


def plan_for(model, layers: range):
    return plan_pruning(model, Importance("l2", "sum"), 0.5, layers)


def full_pruned_ppl(model, plan, val) -> float:
    pruned = shared_copy(model)
    apply_plan(pruned, plan)
    return perplexity(pruned, val, batch_size=2, progress=False)


@pytest.mark.parametrize("name", ["gqa_model", "qwen2_model"])
@pytest.mark.parametrize("start", [0, 1])
def test_score_equals_a_full_forward_of_the_pruned_model(request, name, start):
    model = request.getfixturevalue(name)
    n_layers = len(model.model.layers)
    plan = plan_for(model, range(start, n_layers))
    val = windows()
    scorer = ValidationScorer(model, val, start, "float32", batch_size=2)
    assert scorer.prefix.shape == (5, SEQ, model.config.hidden_size)
    assert scorer.score(plan) == pytest.approx(full_pruned_ppl(model, plan, val), rel=1e-5)


def test_inputs_embeds_path_matches_input_ids(gqa_model):
    val = windows()
    embeds = gqa_model.model.embed_tokens(val).detach()
    assert perplexity(gqa_model, val, 2, progress=False, inputs_embeds=embeds) == pytest.approx(
        perplexity(gqa_model, val, 2, progress=False), rel=1e-6
    )


def test_scoring_leaves_the_dense_model_untouched_and_shares_its_tensors(gqa_model):
    before = {name: p.clone() for name, p in gqa_model.state_dict().items()}
    val = windows()
    dense_ppl = perplexity(gqa_model, val, 2, progress=False)
    scorer = ValidationScorer(gqa_model, val, 1, "float32", batch_size=2)
    plan = plan_for(gqa_model, range(1, 3))
    scorer.score(plan)
    pruned = scorer.pruned(plan)
    assert pruned.model.layers[0].self_attn.q_proj.weight is gqa_model.model.layers[0].self_attn.q_proj.weight
    assert pruned.model.embed_tokens.weight is gqa_model.model.embed_tokens.weight
    assert (
        pruned.model.layers[1].mlp.gate_proj.out_features == 12 < gqa_model.model.layers[1].mlp.gate_proj.out_features
    )
    assert all(torch.equal(before[name], p) for name, p in gqa_model.state_dict().items())
    assert len(gqa_model.model.layers) == 3 and perplexity(gqa_model, val, 2, progress=False) == dense_ppl
    assert (
        len(scorer.base.model.layers) == 3 and scorer.base.model.layers[1].mlp.gate_proj.out_features == 24
    )  # the next trial's base


def test_bf16_scorer_is_close_to_fp32_and_casts_only_its_copy(gqa_model):
    val = windows()
    plan = plan_for(gqa_model, range(1, 3))
    bf16 = ValidationScorer(gqa_model, val, 1, "bfloat16", batch_size=2)
    assert bf16.base.model.layers[2].mlp.up_proj.weight.dtype == torch.bfloat16
    assert gqa_model.model.layers[2].mlp.up_proj.weight.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: per-token log-probabilities move by ~1e-2, the perplexity by well under 3%
    assert bf16.score(plan) == pytest.approx(full_pruned_ppl(gqa_model, plan, val), rel=3e-2)


def test_a_plan_that_cuts_a_cached_layer_is_refused(gqa_model):
    scorer = ValidationScorer(gqa_model, windows(), 1, "float32")
    with pytest.raises(AdaPrunerError, match="prunes a layer before 1"):
        scorer.score(plan_for(gqa_model, range(0, 3)))


def test_val_dtype_names():
    assert resolve_val_dtype("float32", torch.device("cpu")) == "float32"
    assert resolve_val_dtype("auto", torch.device("cpu")) == (
        "bfloat16" if native_bf16(torch.device("cpu")) else "float32"
    )
    with pytest.raises(AdaPrunerError, match="unknown --val-dtype 'fp8'"):
        resolve_val_dtype("fp8", torch.device("cpu"))
