"""Save/load round trips: remote-code save of layers of different sizes, stock save of uniform layers."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapruner.choosing.selection import plan_pruning
from adapruner.cutting.removal import apply_plan
from adapruner.errors import AdaPrunerError
from adapruner.model.models import load_model
from adapruner.model.structure import layer_info
from adapruner.output.saving import save_pruned
from adapruner.scoring.importance import Importance


def prune(model, layers, granularity="kv", ratio=0.5):
    apply_plan(model, plan_pruning(model, Importance("l1"), ratio, layers, granularity))
    return model


def max_logit_gap(a, b, tokens) -> float:
    with torch.no_grad():
        return (a(input_ids=tokens).logits - b(input_ids=tokens).logits).abs().max().item()


@pytest.mark.parametrize(
    ("fixture", "heads", "kv_heads"),
    [  # ratio 0.5 in layer 1: half of the kv groups go, with their query heads
        ("mha_model", [4, 2, 4], [4, 2, 4]),
        ("gqa_model", [6, 3, 6], [2, 1, 2]),
        ("qwen2_model", [6, 3], [2, 1]),
    ],
)
def test_remote_code_round_trip(fixture, heads, kv_heads, request, tmp_path, tokenizer, token_batch):
    model = prune(request.getfixturevalue(fixture), range(1, 2))
    out = save_pruned(model, tokenizer, tmp_path / "pruned", extra_json={"report.json": {"ok": 1}})
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned.")
    assert config["num_attention_heads_per_layer"] == heads and config["num_key_value_heads_per_layer"] == kv_heads
    assert config["intermediate_size_per_layer"][1] == 12 and set(config["intermediate_size_per_layer"]) == {24, 12}
    assert (out / "model.safetensors").is_file() and json.loads((out / "report.json").read_text()) == {"ok": 1}
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert max_logit_gap(model, loaded, token_batch) < 1e-4
    assert layer_info(loaded, 1).n_heads == layer_info(model, 1).n_heads


def test_uniform_save_loads_without_remote_code(mha_model, tmp_path, tokenizer, token_batch):
    model = prune(mha_model, range(0, 3))
    out = save_pruned(model, tokenizer, tmp_path / "uniform", stock_config=True)
    assert not (out / "modeling_pruned.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["num_attention_heads"] == 2 and config["intermediate_size"] == 12
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert max_logit_gap(model, loaded, token_batch) < 1e-4


def test_uniform_refuses_layers_of_different_sizes(mha_model, tmp_path, tokenizer):
    with pytest.raises(AdaPrunerError, match="--stock-config needs equal sizes"):
        save_pruned(prune(mha_model, range(1, 2)), tokenizer, tmp_path / "u", stock_config=True)
    assert list(tmp_path.iterdir()) == []


def test_the_old_uniform_keyword_still_saves_a_stock_config_with_a_deprecation_warning(mha_model, tmp_path, tokenizer):
    with pytest.warns(DeprecationWarning, match="stock_config"):
        out = save_pruned(prune(mha_model, range(0, 3)), tokenizer, tmp_path / "old", uniform=True)
    assert not (out / "modeling_pruned.py").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())


def test_existing_output_is_never_overwritten(mha_model, tmp_path, tokenizer):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AdaPrunerError, match="already exists"):
        save_pruned(mha_model, tokenizer, out)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and (out / "keep.txt").read_text() == "mine"


def test_failed_save_leaves_nothing(mha_model, tmp_path, tokenizer):
    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        save_pruned(mha_model, tokenizer, tmp_path / "x", extra_json={"report.json": {"bad": Unserialisable()}})
    assert list(tmp_path.iterdir()) == []


def plant(path, marker) -> None:
    """A modeling file that leaves `marker` behind when Python runs it, then offers the stock class."""
    path.write_text(
        "import pathlib\nfrom transformers import LlamaForCausalLM\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n\n"
        "class PlantedForCausalLM(LlamaForCausalLM):\n    pass\n"
    )


def test_code_shipped_with_a_model_runs_only_when_trusted(gqa_model, tokenizer, tmp_path):
    model_dir, marker = tmp_path / "model", tmp_path / "ran"
    gqa_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    plant(model_dir / "modeling_planted.py", marker)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_planted.PlantedForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    load_model(str(model_dir))
    assert not marker.exists()
    load_model(str(model_dir), trust_remote_code=True)
    assert marker.exists()  # the plant works: it runs when the user opts in


def test_own_pruned_model_loads_without_trusting_the_file_beside_it(gqa_model, tokenizer, tmp_path, token_batch):
    model = prune(gqa_model, range(1, 2))
    out = save_pruned(model, tokenizer, tmp_path / "pruned")
    marker = tmp_path / "ran"
    plant(
        out / "modeling_pruned.py", marker
    )  # whatever the directory's copy holds, the package's own code builds the model
    loaded, _ = load_model(str(out))
    assert not marker.exists() and type(loaded).__name__ == "PrunedLlamaForCausalLM"
    assert max_logit_gap(model, loaded, token_batch) < 1e-5


def test_a_model_that_needs_its_own_code_asks_for_the_flag(gqa_model, tokenizer, tmp_path):
    model_dir = tmp_path / "custom"
    gqa_model.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(
        model_type="planted",
        auto_map={
            "AutoConfig": "modeling_planted.PlantedConfig",
            "AutoModelForCausalLM": "modeling_planted.PlantedForCausalLM",
        },
    )
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdaPrunerError, match="pass --trust-remote-code"):
        load_model(str(model_dir))
