"""Torch-Pruning's MetaPruner driven by adapruner's importance: it prunes heads and MLP channels of a tiny LLaMA, the
model still runs, and the MLP groups get exactly adapruner's own group scores."""

import pytest
import torch

tp = pytest.importorskip("torch_pruning")

from adapruner.integrations.torch_pruning import AdaPrunerImportance  # noqa: E402
from adapruner.model.structure import layer_info, mlp_group  # noqa: E402
from adapruner.scoring.importance import Importance  # noqa: E402
from tests.models import tiny_llama  # noqa: E402


def logits(out):
    return out.logits


@pytest.mark.parametrize("metric", ["l2", "taylor1", "taylor2", "fluct"])
def test_mlp_group_scores_are_adapruner_s(metric):
    model = tiny_llama(n_heads=4, n_kv=2, layers=2)
    ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    imp = AdaPrunerImportance(metric, group_reduction="sum", normalizer=None)
    imp.calibrate(model, ids)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=ids, output_transform=logits)
    stats = {name: imp.stats[module] for name, module in model.named_modules() if module in imp.stats}
    for index in range(2):
        info = layer_info(model, index)
        group = graph.get_pruning_group(
            info.mlp.gate_proj, tp.prune_linear_out_channels, idxs=list(range(info.intermediate))
        )
        torch.testing.assert_close(
            imp(group), Importance(metric, "sum", stats)(mlp_group(info)).float(), rtol=1e-6, atol=0
        )


def test_meta_pruner_with_adapruner_importance_prunes_heads_and_channels():
    model = tiny_llama(n_heads=4, n_kv=4, layers=2)
    model.config._attn_implementation, model.config.use_cache = (
        "eager",
        False,
    )  # a graph Torch-Pruning traces in seconds
    ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(1))
    imp = AdaPrunerImportance("taylor1", group_reduction="mean", normalizer="mean")
    imp.calibrate(model, ids)
    num_heads = {}
    for layer in model.model.layers:
        attn = layer.self_attn
        num_heads.update({attn.q_proj: 4, attn.k_proj: 4, attn.v_proj: 4})
    norms = [(module.weight, 0) for name, module in model.named_modules() if name.endswith("norm")]
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=ids,
        importance=imp,
        pruning_ratio=0.5,
        num_heads=num_heads,
        ignored_layers=[model.lm_head, model.model.embed_tokens],
        unwrapped_parameters=norms,  # hidden size stays
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.5,
        output_transform=logits,
    )
    pruner.step()
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.out_features == 12 and layer.mlp.down_proj.in_features == 12  # 24 → 12 channels
        assert (
            layer.self_attn.q_proj.out_features == 16 and layer.self_attn.o_proj.in_features == 16
        )  # 4 → 2 heads of 8
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.shape == (4, 9, 97) and torch.isfinite(out).all() and model.model.embed_tokens.weight.shape == (97, 48)


def test_the_old_class_name_works_for_one_release_with_a_deprecation_warning():
    from adapruner.integrations.torch_pruning import AdapPrunerImportance

    with pytest.warns(DeprecationWarning, match="AdaPrunerImportance"):
        old = AdapPrunerImportance("l2", group_reduction="sum", normalizer=None)
    assert isinstance(old, AdaPrunerImportance) and old.metric == "l2"
