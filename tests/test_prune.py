"""Physical pruning equals masking the removed units in the dense model; ratio semantics and errors."""

import pytest
import torch

from adapruner.choosing.allocation import count_params, ratio_counts, removal_count, removed_by
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import plan_pruning, top_units
from adapruner.cutting.removal import apply_plan
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import layer_info
from adapruner.scoring.importance import Importance
from tests.helpers import masked_logits


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fixture", ["mha_model", "gqa_model", "qwen2_model"])
@pytest.mark.parametrize("granularity", ["kv", "query"])
def test_pruned_model_equals_masked_dense_model(fixture, granularity, backend, request, token_batch, device):
    model, token_batch = request.getfixturevalue(fixture).to(device), token_batch.to(device)
    ratio = 0.5 if granularity == "kv" else 0.34
    plan = plan_pruning(model, Importance("l2"), ratio, range(0, 2), granularity)
    expected = masked_logits(model, plan, token_batch)
    before, predicted = (
        count_params(model),
        removed_by(model, ratio_counts(model, range(0, 2), ratio, granularity), granularity),
    )
    apply_plan(model, plan, backend)
    with torch.no_grad():
        got = model(input_ids=token_batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert before - count_params(model) == predicted


def test_gqa_kv_pruning_keeps_a_valid_layout(gqa_model):
    plan = plan_pruning(gqa_model, Importance("l1"), 0.5, range(1, 2), "kv")
    apply_plan(gqa_model, plan)
    info = layer_info(gqa_model, 1)
    assert (info.n_heads, info.n_kv_heads, info.attn.num_key_value_groups) == (3, 1, 3)
    assert info.intermediate == 12
    keep_q, keep_kv = plan.attention[1]
    assert keep_q == [keep_kv[0] * 3 + j for j in range(3)]


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


def test_plan_round_trips_and_counts_differing_units():
    plan = PrunePlan({4: ([0, 1, 5], [0, 2])}, {4: [0, 3, 11007], 5: []})
    assert plan.encode()["attention"]["4"] == ["0x23", "0x5"]  # bits 0, 1, 5 and 0, 2
    assert PrunePlan.decode(plan.encode()) == plan and PrunePlan.from_dict(plan.to_dict()) == plan
    other = PrunePlan({4: ([0, 1, 6], [0, 2])}, {4: [0, 3, 5], 5: []})
    assert plan.units_differing(other) == {"query_heads": 1, "kv_heads": 0, "mlp_channels": 1}
