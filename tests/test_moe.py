"""MoE families (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert) on tiny random models: MLP channels are cut
inside every expert (each expert keeps its own channels, one count per layer, so the stored tensors stay 3-D),
attention as for dense models, the router and the number of experts untouched."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapruner.choosing.selection import plan_from_counts, plan_pruning, score_layers
from adapruner.choosing.spec import PruneSpec
from adapruner.commands.search import run_search
from adapruner.cutting.pruning import PruneOptions, apply_study_plan, prune_model
from adapruner.cutting.removal import apply_plan
from adapruner.errors import AdaPrunerError
from adapruner.model.families import family_of
from adapruner.model.models import load_model
from adapruner.model.structure import layer_info
from adapruner.output.saving import save_pruned
from adapruner.scoring.importance import Importance
from adapruner.searching.search_options import SearchOptions
from tests.helpers import MOE_TYPES, byte_level_tokenizer, masked_logits, tiny_family, tiny_search
from tests.models import word_level_tokenizer

TOKENS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
EXPERTS, CHANNELS = 4, 24


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    relative = (got - expected).abs().max() / expected.abs().max()
    assert relative < 1e-4, float(relative)


def experts_of(model, layer: int):
    return layer_info(model, layer).mlp.experts


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_zeroed_expert_channels_are_what_l2_removes_and_the_reload_is_the_dense_model(model_type, tmp_path):
    model = tiny_family(model_type)
    zeroed = {e: [e, e + 7, e + 13] for e in range(EXPERTS)}  # each expert its own channels
    experts = experts_of(model, 1)
    with torch.no_grad():
        for e, channels in zeroed.items():
            for c in channels:
                experts.gate_up_proj[e, c] = 0
                experts.gate_up_proj[e, CHANNELS + c] = 0
                experts.down_proj[e, :, c] = 0
    dense = logits(model)
    plan = plan_from_counts(model, score_layers(model, Importance("l2"), {1: (False, True)}, "kv"), {1: (0, 3)}, "kv")
    assert plan.mlp[1] == [e * CHANNELS + c for e in range(EXPERTS) for c in range(CHANNELS) if c not in zeroed[e]]
    apply_plan(model, plan)
    assert tuple(experts_of(model, 1).gate_up_proj.shape) == (EXPERTS, 2 * (CHANNELS - 3), 32)
    assert tuple(experts_of(model, 1).down_proj.shape) == (EXPERTS, 32, CHANNELS - 3)
    assert_same_logits(logits(model), dense)
    save_pruned(model, word_level_tokenizer(), tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    assert experts_of(reloaded, 1).gate_up_proj.shape[0] == EXPERTS and layer_info(reloaded, 1).intermediate == 21
    assert_same_logits(logits(reloaded), dense)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_pruned_moe_equals_the_dense_model_with_the_units_masked(model_type):
    model = tiny_family(model_type, seed=1)
    plan = plan_pruning(model, Importance("l2"), 0.5, range(0, 4), "kv")
    router = layer_info(model, 2).mlp.gate.weight.detach().clone()
    expected = masked_logits(model, plan, TOKENS)
    apply_plan(model, plan)
    assert_same_logits(logits(model), expected)
    assert all(layer_info(model, i).intermediate == CHANNELS // 2 for i in range(4))
    assert torch.equal(layer_info(model, 2).mlp.gate.weight, router)  # the router and the expert count stay


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_a_uniform_moe_save_loads_with_the_stock_class(model_type, tmp_path):
    model = tiny_family(model_type, seed=2)
    apply_plan(model, plan_pruning(model, Importance("l2"), 0.5, range(0, 4), "kv"))
    pruned = logits(model)
    save_pruned(model, word_level_tokenizer(), tmp_path / "uniform", stock_config=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    assert type(reloaded).__name__ == family_of(model.config).model_class
    assert experts_of(reloaded, 0).down_proj.shape == (EXPERTS, 32, CHANNELS // 2)
    assert_same_logits(logits(reloaded), pruned)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_a_search_runs_on_moe_families(model_type, tmp_path):
    best = tiny_search(tmp_path, tiny_family(model_type), metrics=("l1", "l2"), compensations=("none", "lsq"))
    dense, tokenizer = load_model(str(tmp_path / "model"))
    assert apply_study_plan(dense, best, tokenizer, progress=False).plan == best.prune_plan
    assert [experts_of(dense, i).down_proj.shape for i in range(4)] == [(EXPERTS, 32, CHANNELS // 2)] * 4


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_data_metrics_on_experts_are_one_line_errors(model_type, tmp_path):
    model = tiny_family(model_type)
    with pytest.raises(AdaPrunerError, match="scores MoE experts from their weights"):
        prune_model(model, word_level_tokenizer(), PruneOptions(PruneSpec(0.5, metric="taylor1"), calib="news:2"))
    # attention alone takes every metric
    tiny_family(model_type).save_pretrained(tmp_path / "model")
    byte_level_tokenizer().save_pretrained(tmp_path / "model")
    options = SearchOptions(
        model=str(tmp_path / "model"), spec=PruneSpec(0.5, layers="all"), metrics=("taylor1",), seq_len=16
    )
    with pytest.raises(AdaPrunerError, match="scores MoE experts from their weights"):
        run_search(options, Path(tmp_path / "s"), progress=False)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_moe_budgets_are_met_within_one_channel_of_every_expert(allocation):
    from adapruner.choosing.allocation import count_params, prices
    from adapruner.choosing.selection import plan_allocation
    from adapruner.cutting.removal import plan_removed

    model = tiny_family("qwen3_moe", seed=4)
    spec = PruneSpec(None, target_params=0.2, layers="all", allocation=allocation, metric="l2")
    plan = plan_allocation(model, Importance("l2"), spec)
    target, removed = 0.2 * count_params(model), plan_removed(model, plan)
    channel = prices(layer_info(model, 0), "kv")[1]  # one channel of every expert
    assert target <= removed < target + channel
    for kept in plan.mlp.values():
        per_expert = [sum(1 for unit in kept if unit // CHANNELS == e) for e in range(EXPERTS)]
        assert len(set(per_expert)) == 1  # every expert of a layer keeps as many channels
    before = count_params(model)
    apply_plan(model, plan)
    assert before - count_params(model) == removed
