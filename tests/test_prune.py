"""Physical pruning equals masking the removed units in the dense model; a kv cut keeps a valid GQA layout; plans
round-trip (ratio semantics and their errors: tests/test_selection.py)."""

import pytest
import torch

from adapruner.choosing.allocation import count_params, ratio_counts, removed_by
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import plan_pruning
from adapruner.cutting.removal import apply_plan
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


def test_plan_round_trips_and_counts_differing_units():
    plan = PrunePlan({4: ([0, 1, 5], [0, 2])}, {4: [0, 3, 11007], 5: []})
    assert plan.encode()["attention"]["4"] == ["0x23", "0x5"]  # bits 0, 1, 5 and 0, 2
    assert PrunePlan.decode(plan.encode()) == plan and PrunePlan.from_dict(plan.to_dict()) == plan
    other = PrunePlan({4: ([0, 1, 6], [0, 2])}, {4: [0, 3, 5], 5: []})
    assert plan.units_differing(other) == {"query_heads": 1, "kv_heads": 0, "mlp_channels": 1}
