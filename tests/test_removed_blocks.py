"""Removed blocks (issue 33, depth): a layer may lose its whole attention or MLP (`--min-keep 0`). The pruned model —
in memory and reloaded with the shipped modeling file — computes the dense model with those blocks skipped, on every
family; an lsq refit of no kept units leaves the block's mean output as a bias; the `loss` allocation at min_keep 0
removes a block that contributes nothing."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapruner.choosing.allocation import removed_by
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import allocate, plan_from_counts
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.compensation import refit_updates
from adapruner.cutting.removal import apply_plan, cut
from adapruner.errors import AdaPrunerError
from adapruner.model.families import text_config
from adapruner.model.structure import decoder_layers, layer_info
from adapruner.output.saving import save_pruned
from adapruner.scoring.sources import CalibrationPasses
from adapruner.searching.widths import WidthSpace
from tests.helpers import FAMILY_TYPES, tiny_family
from tests.models import tiny_llama, word_level_tokenizer

TOKENS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def skip_blocks(model, attention: int, mlp: int) -> None:
    """Zero the output projections (and their biases) of layer `attention`'s attention and layer `mlp`'s MLP: the
    dense model with those blocks skipped."""
    with torch.no_grad():
        for linear in (layer_info(model, attention).attn.o_proj, layer_info(model, mlp).mlp.down_proj):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_a_model_with_removed_blocks_is_the_dense_one_with_them_skipped(model_type, tmp_path):
    model = tiny_family(model_type)
    skipped = copy.deepcopy(model)
    skip_blocks(skipped, attention=1, mlp=2)
    expected = logits(skipped)
    apply_plan(model, PrunePlan({1: ([], [])}, {2: []}))
    assert (layer_info(model, 1).n_heads, layer_info(model, 2).intermediate) == (0, 0)
    got = logits(model)
    assert ((got - expected).abs().max() / expected.abs().max()) < 1e-5
    save_pruned(model, word_level_tokenizer(), tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    again = logits(reloaded)
    assert ((again - expected).abs().max() / expected.abs().max()) < 1e-5


def test_the_refit_of_a_removed_block_is_its_mean_output():
    model = tiny_llama(4, 2)
    ids = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(1))
    plan = PrunePlan({1: ([], [])}, {2: []})
    updates = refit_updates(model, plan, CalibrationPasses(ids, progress=False), "lsq", 0.3)
    outputs = {}
    hooks = [
        decoder_layers(model)[1].self_attn.o_proj.register_forward_hook(lambda m, i, o: outputs.update(attn=o)),
        decoder_layers(model)[2].mlp.down_proj.register_forward_hook(lambda m, i, o: outputs.update(mlp=o)),
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    cut(model, plan, updates)
    for linear, name in (
        (decoder_layers(model)[1].self_attn.o_proj, "attn"),
        (decoder_layers(model)[2].mlp.down_proj, "mlp"),
    ):
        assert linear.in_features == 0
        torch.testing.assert_close(linear.bias, outputs[name].reshape(-1, 48).mean(0), rtol=1e-4, atol=1e-6)


def test_a_scored_allocation_at_min_keep_zero_removes_a_block_that_adds_nothing():
    model = tiny_llama(4, 2, layers=4)
    with torch.no_grad():
        decoder_layers(model)[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(2))
    statistics = CalibrationPasses(ids, progress=False)
    spec = PruneSpec(None, target_params=0.08, metric="fluct", allocation="loss", layers="all", min_keep=0.0)
    counts = allocate(model, statistics.importance(model, spec), spec)[0]
    assert counts[2][1] == 24, counts
    kept_one = spec.with_(min_keep=0.01)
    assert allocate(model, statistics.importance(model, kept_one), kept_one)[0][2][1] == 23


def test_a_widths_space_at_min_keep_zero_removes_whole_blocks_within_the_budget():
    model = tiny_llama(4, 2, layers=4)
    spec = PruneSpec(None, target_params=0.3, metric="fluct", allocation="uniform", granularity="query", min_keep=0.0)
    space = WidthSpace.of(model, spec)
    assert set(space.floors.values()) == {0}
    assert space.bonus[(1, "attn")] == 2 * 2 * 8 * 48  # its 2 kv heads: k and v rows of 8 × 48
    counts = space.counts({m: (1.0 if m in ((1, "attn"), (1, "mlp")) else 0.01) for m in space.units})
    assert counts[1][0] == 2  # both query heads of each kv group: the block
    removed = removed_by(model, counts, "query")
    assert space.target <= removed < space.target + space.prices[(0, "mlp")]
    scores = {(i, kind): torch.rand(4 if kind == "attn" else 24) for i, kind in space.units}
    plan = plan_from_counts(model, scores, counts, "query")
    assert plan.attention[1] == ([], [])
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan)
    assert before - sum(p.numel() for p in model.parameters()) == removed


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3"])
def test_a_removed_layers_only_save_loads_with_the_stock_class_and_fewer_layers(model_type, tmp_path):
    """Layer 1 loses its attention and MLP, the others keep their size: a stock config with 3 layers (gemma2's
    sliding/global layer types keep their layers'), the logits of the dense model with layer 1 skipped; the model in
    memory keeps its 4 layers."""
    model = tiny_family(model_type)
    skipped = copy.deepcopy(model)
    skip_blocks(skipped, attention=1, mlp=1)
    expected = logits(skipped)
    types = getattr(text_config(model.config), "layer_types", None)
    apply_plan(model, PrunePlan({1: ([], [])}, {1: []}))
    save_pruned(model, word_level_tokenizer(), tmp_path / "pruned", stock_config=True)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and "auto_map" not in config
    if types is not None:
        assert config["layer_types"] == [t for i, t in enumerate(types) if i != 1]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(reloaded) is type(model) and len(decoder_layers(reloaded)) == 3
    again = logits(reloaded)
    assert ((again - expected).abs().max() / expected.abs().max()) < 1e-5
    assert len(decoder_layers(model)) == 4 and text_config(model.config).num_hidden_layers == 4
    assert ((logits(model) - expected).abs().max() / expected.abs().max()) < 1e-5


def test_a_stock_save_refuses_layers_of_other_sizes_beside_removed_ones(tmp_path):
    model = tiny_llama(4, 2, layers=4)
    apply_plan(model, PrunePlan({1: ([], []), 2: ([0], [0, 1])}, {1: []}))
    with pytest.raises(AdaPrunerError, match="equal sizes in every layer it keeps"):
        save_pruned(model, word_level_tokenizer(), tmp_path / "pruned", stock_config=True)
    assert not (tmp_path / "pruned").exists()
