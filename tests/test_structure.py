"""Pruning groups: GQA kv-group scores against a brute-force computation, layer ranges, unsupported models."""

import pytest
import torch
from transformers import GPT2Config

from adapruner.errors import AdaPrunerError
from adapruner.model.families import check_supported
from adapruner.model.structure import (
    attention_group,
    default_layer_range,
    layer_info,
    mlp_group,
    parse_layer_range,
    prunable_linears,
)
from adapruner.scoring.importance import Importance


def brute_force_kv_scores(info) -> list[float]:
    """l1 score of kv group h: |q rows of query heads h·r…h·r+r-1| + |k, v rows of head h|
    + |o columns of those heads|."""
    a, hd, r = info.attn, info.head_dim, info.heads_per_kv
    scores = []
    for h in range(info.n_kv_heads):
        total = 0.0
        for q in range(info.n_heads):
            if q // r == h:  # HF repeat_kv: query head q reads kv head q // r
                total += a.q_proj.weight[q * hd : (q + 1) * hd].abs().sum().item()
                total += a.o_proj.weight[:, q * hd : (q + 1) * hd].abs().sum().item()
        total += a.k_proj.weight[h * hd : (h + 1) * hd].abs().sum().item()
        total += a.v_proj.weight[h * hd : (h + 1) * hd].abs().sum().item()
        scores.append(total)
    return scores


@pytest.mark.parametrize("fixture", ["gqa_model", "mha_model"])
def test_kv_group_scores_match_brute_force(fixture, request):
    model = request.getfixturevalue(fixture)
    info = layer_info(model, 1)
    got = Importance("l1", "sum")(attention_group(info, "kv"))
    torch.testing.assert_close(got, torch.tensor(brute_force_kv_scores(info)), rtol=1e-5, atol=1e-4)


def test_query_granularity_scores_each_query_head(gqa_model):
    info = layer_info(gqa_model, 0)
    a, hd = info.attn, info.head_dim
    got = Importance("l2", "sum")(attention_group(info, "query"))
    expected = [
        a.q_proj.weight[q * hd : (q + 1) * hd].square().sum() + a.o_proj.weight[:, q * hd : (q + 1) * hd].square().sum()
        for q in range(6)
    ]
    torch.testing.assert_close(got, torch.stack(expected))


def test_layer_info_reads_shapes_from_modules(gqa_model):
    info = layer_info(gqa_model, 2)
    assert (info.n_heads, info.n_kv_heads, info.head_dim, info.intermediate, info.heads_per_kv) == (6, 2, 8, 24, 3)
    assert mlp_group(info).n_units == 24
    names = prunable_linears(gqa_model, range(1, 2))
    assert sorted(n.rsplit(".", 1)[1] for n in names) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_default_layer_range_follows_llm_pruner():
    assert default_layer_range(32) == range(4, 30)
    assert default_layer_range(30) == range(4, 28)
    assert parse_layer_range(None, 30) == range(4, 28)
    assert parse_layer_range("all", 5) == range(5)
    assert parse_layer_range("2:-1", 6) == range(2, 5)
    with pytest.raises(AdaPrunerError, match="START:STOP"):
        parse_layer_range("x", 6)
    with pytest.raises(AdaPrunerError, match="selects no layer"):
        parse_layer_range("4:2", 6)
    for spec in ("9:12", "2:40", "-7:3"):  # refused, not clamped silently
        with pytest.raises(AdaPrunerError, match="reaches past the model's 6 layers"):
            parse_layer_range(spec, 6)


def test_unsupported_architecture_is_named():
    with pytest.raises(AdaPrunerError, match="unsupported architecture 'gpt2'"):
        check_supported(GPT2Config())
