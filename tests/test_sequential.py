"""Sequential layer-wise pruning (`adapruner.cutting.sequential`): each layer is chosen and refit from the inputs the
already-pruned layers give, gradient metrics and MoE experts are refused in one line (before any model loads), a
study's sequential recipe is applied layer by layer, and with a weight metric and no refit it is the one-shot prune."""

import copy

import pytest
import torch

from adapruner.choosing.selection import plan_allocation, scoreless_counts
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.pruning import PruneOptions, apply_study_plan, prune_model
from adapruner.cutting.removal import apply_plan
from adapruner.cutting.sequential import check_sequential, prune_sequential
from adapruner.data.calibration import windows_at
from adapruner.errors import AdaPrunerError
from adapruner.model.models import load_model
from adapruner.model.structure import (
    decoder_layers,
    head_channels,
    layer_info,
    output_projections,
    prunable_linears,
)
from adapruner.scoring.collect import collect_input_moments, collect_stats
from adapruner.scoring.importance import Importance
from tests.helpers import byte_level_tokenizer, one_error_line, run_cli, tiny_family, tiny_search


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_sequential_statistics_are_a_fresh_pass_through_the_pruned_layers(model_type):
    """Each output projection is chosen and refit from the moments a fresh pass of the final pruned model gives at its
    kept inputs: the layers before it are already pruned and compensated (Gemma-3: per-layer masks and rotary)."""
    model = tiny_family(model_type)
    tokens = torch.randint(0, 97, (10, 16), generator=torch.Generator().manual_seed(4))
    spec = PruneSpec(0.5, layers="all", metric="obs", granularity="query", compensation="lsq", sequential=True)
    seen = {}
    plan, refit = prune_sequential(
        model, tokens, spec, {i: (1, 12) for i in range(4)}, observe=seen.__setitem__, progress=False
    )
    fresh = collect_input_moments(model, output_projections(model, range(4)), tokens, gram=True, progress=False)
    assert set(seen) == set(fresh) and sorted(refit) == sorted(fresh)
    for name, moments in seen.items():
        index = int(name.split(".layers.")[1].split(".")[0])
        if name.endswith("o_proj"):
            kept = head_channels(plan.attention[index][0], layer_info(model, index).head_dim)
        else:
            kept = torch.tensor(plan.mlp[index])
        torch.testing.assert_close(moments.mean[kept], fresh[name].mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(moments.gram[kept][:, kept], fresh[name].gram, atol=1e-5, rtol=1e-4)
    dense = tiny_family(model_type)
    first = collect_input_moments(dense, output_projections(dense, [3]), tokens, progress=False)
    down = next(n for n in seen if n.endswith("3.mlp.down_proj"))
    assert not torch.allclose(seen[down].mean, first[down].mean, rtol=1e-2, atol=0)  # not the dense statistics


def test_sequential_refuses_gradient_metrics_in_one_line():
    with pytest.raises(AdaPrunerError, match="needs the whole model's gradients"):
        check_sequential(PruneSpec(0.25, metric="taylor1", sequential=True))


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "--model", "smollm2", "--sequential", "--metric", "taylor1", "--no-eval"],
        ["search", "--sequential", "--metrics", "obs,taylor2"],
        ["run", "--sequential", "--metrics", "vector"],
    ],
)
def test_sequential_with_a_gradient_metric_is_refused_before_loading(argv, capsys, tmp_path):
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and one_error_line(err, "needs the whole model's gradients")
    assert list(tmp_path.iterdir()) == []


def test_a_sequential_study_applies_its_best_recipe_layer_by_layer(tmp_path):
    model = tiny_family("llama")
    best = tiny_search(
        tmp_path, model, spec=PruneSpec(0.5, layers="all", sequential=True), metrics=("obs", "act"), trials=2
    )
    loaded, tokenizer = load_model(str(tmp_path / "model"))
    applied = apply_study_plan(copy.deepcopy(loaded), best, tokenizer, progress=False)
    windows = windows_at(tokenizer, [tuple(a) for a in best.addresses], best.seq_len).input_ids
    counts = scoreless_counts(loaded, best.prune_spec, range(4))
    plan, _ = prune_sequential(loaded, windows, best.prune_spec, counts, progress=False)
    assert best.prune_spec.sequential and applied.plan == plan


def test_sequential_refuses_moe_experts_in_one_line():
    model = tiny_family("mixtral")
    options = PruneOptions(PruneSpec(0.25, layers="all", metric="l2", sequential=True), calib="news:2")
    with pytest.raises(AdaPrunerError, match="--sequential reads each layer's linears"):
        prune_model(model, byte_level_tokenizer(), options, progress=False)


def test_with_a_weight_metric_and_no_refit_it_is_the_one_shot_prune():
    """l2 reads weights alone and `none` changes none: the layer-by-layer plan and model are the one-shot ones."""
    model = tiny_family("llama")
    dense = copy.deepcopy(model)
    tokens = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(5))
    spec = PruneSpec(0.5, layers="all", metric="l2", granularity="query", sequential=True)
    plan, refit = prune_sequential(model, tokens, spec, scoreless_counts(model, spec, range(4)), progress=False)
    expected = plan_allocation(dense, Importance("l2"), spec)
    assert plan == expected and refit == []
    assert [len(plan.mlp[i]) for i in range(4)] == [12] * 4 and all(len(q) == 2 for q, _ in plan.attention.values())
    apply_plan(dense, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, dense(input_ids=tokens).logits)


def test_the_first_pruned_layer_sees_the_dense_inputs_and_the_layers_before_it_stay():
    """Pruning layers 1 and 2 by `act`: layer 1's attention is chosen from the dense model's inputs (the one-shot
    statistics choose the same heads), and layer 0, outside the range, keeps every weight."""
    model = tiny_family("llama")
    dense = copy.deepcopy(model)
    tokens = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(6))
    spec = PruneSpec(0.5, layers="1:3", metric="act", granularity="query", sequential=True)
    plan, _ = prune_sequential(model, tokens, spec, scoreless_counts(model, spec, range(1, 3)), progress=False)
    assert sorted(plan.attention) == sorted(plan.mlp) == [1, 2]
    stats = collect_stats(dense, prunable_linears(dense, range(1, 3)), tokens, frozenset({"act_norm"}), progress=False)
    one_shot = plan_allocation(dense, Importance("act", stats=stats), spec)
    assert plan.attention[1] == one_shot.attention[1]
    pruned_first = decoder_layers(model)[0].state_dict()
    for name, weight in decoder_layers(dense)[0].state_dict().items():
        torch.testing.assert_close(pruned_first[name], weight, rtol=0, atol=0)
