"""LoRA recovery and the Torch-Pruning integration on the families with per-head norms (Qwen3) and fused
projections (Phi-3): LoRA targets the family's projections, training lowers the loss and the merged, saved and
reloaded model computes what the adapter did; Torch-Pruning groups get adapruner's group scores, and its pruner runs
with them (on Qwen3: Torch-Pruning's pruner splits Phi-3's fused gate_up rows unevenly, a limit of its graph)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapruner.choosing.selection import plan_pruning
from adapruner.cutting.removal import apply_plan
from adapruner.evaluation.finetune import LoraOptions, finetune, merged
from adapruner.model.structure import layer_info, mlp_group, projection_names
from adapruner.output.saving import save_pruned
from adapruner.scoring.importance import Importance
from tests.helpers import tiny_family
from tests.models import word_level_tokenizer

FAMILIES = ["qwen3", "phi3"]
TOKENS = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_lora_recovers_a_pruned_model_and_its_merge_reloads(model_type, tmp_path):
    model = tiny_family(model_type)
    apply_plan(model, plan_pruning(model, Importance("l2"), 0.5, range(0, 4), "kv"))
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"t{i % 7 + 3}" for i in range(400)))  # a short repeating pattern: learnable
    tokenizer = word_level_tokenizer()
    options = LoraOptions(r=4, alpha=8, dropout=0.0, lr=1e-2, cutoff=16, batch_size=4, max_steps=40, eval_every=10)
    result = finetune(model, tokenizer, str(text), options, val_windows=TOKENS, progress=False)
    targeted = {
        name.split(".lora_A")[0].rsplit(".", 1)[1] for name, _ in result.model.named_parameters() if "lora_A" in name
    }
    assert targeted == set(projection_names(model))  # phi3: qkv_proj, o_proj, gate_up_proj, down_proj
    assert sum(result.losses[-5:]) / 5 < 0.95 * sum(result.losses[:5]) / 5
    with torch.no_grad():
        adapted = result.model(input_ids=TOKENS).logits
    plain = merged(result)
    save_pruned(plain, tokenizer, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=TOKENS).logits, adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_torch_pruning_groups_get_adapruner_scores_and_its_pruner_runs(model_type):
    tp = pytest.importorskip("torch_pruning")
    from adapruner.integrations.torch_pruning import AdaPrunerImportance

    model = tiny_family(model_type)
    model.config._attn_implementation, model.config.use_cache = "eager", False  # a graph Torch-Pruning traces fast
    imp = AdaPrunerImportance("taylor1", group_reduction="sum", normalizer=None)
    imp.calibrate(model, TOKENS)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=TOKENS, output_transform=lambda out: out.logits)
    stats = {name: imp.stats[module] for name, module in model.named_modules() if module in imp.stats}
    for index in range(4):
        info = layer_info(model, index)
        root = mlp_group(info).members[0]  # gate_proj, or the gate half of Phi-3's gate_up_proj
        group = graph.get_pruning_group(root.linear, tp.prune_linear_out_channels, idxs=list(range(info.intermediate)))
        expected = Importance("taylor1", "sum", stats)(mlp_group(info)).float()
        torch.testing.assert_close(imp(group)[: info.intermediate], expected, rtol=1e-5, atol=0)
    if (
        model_type == "phi3"
    ):  # Torch-Pruning's own pruner cuts Phi-3's fused gate_up rows unevenly (its graph, not ours)
        return
    norms = [(module.weight, 0) for name, module in model.named_modules() if name.endswith("norm")]
    attention = [module for name, module in model.named_modules() if name.endswith("self_attn")]
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=TOKENS,
        importance=imp,
        pruning_ratio=0.5,
        output_transform=lambda out: out.logits,
        ignored_layers=[model.lm_head, model.model.embed_tokens, *attention],
        unwrapped_parameters=norms,
    )
    pruner.step()
    assert [layer_info(model, i).intermediate for i in range(4)] == [12] * 4
    with torch.no_grad():
        out = model(input_ids=TOKENS).logits
    assert out.shape == (4, 9, 97) and torch.isfinite(out).all()
