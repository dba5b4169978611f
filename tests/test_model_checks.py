"""The checks a local model directory passes before any weight is read (`adapruner.model.model_checks`), called
directly (tests/test_damaged_models.py runs every corruption through every command): config sizes, safetensors
headers of one file or shards, shapes against the config's model, the tokenizer beside it, finite weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapruner.errors import AdaPrunerError
from adapruner.model.model_checks import check_config, check_finite, check_shapes, check_tokenizer, weight_headers
from tests.models import tiny_llama

CONFIG = {
    "model_type": "llama",
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "intermediate_size": 24,
    "vocab_size": 97,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaMA saved as one safetensors file, and its state dict's shapes."""
    path = tmp_path_factory.mktemp("model")
    model = tiny_llama(6, 2)
    model.save_pretrained(path)
    return path, {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_a_sound_config_passes_and_optional_sizes_may_be_absent():
    check_config(CONFIG, "config.json")
    check_config({k: v for k, v in CONFIG.items() if k != "num_key_value_heads"}, "config.json")
    check_config({**CONFIG, "num_attention_heads": 7, "num_key_value_heads": 7, "head_dim": 8}, "config.json")
    check_config({"text_config": CONFIG, "hidden_size": "ignored: the text config holds the sizes"}, "config.json")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 0}, "hidden_size is 0, not a positive whole number"),
        ({"num_hidden_layers": -2}, "num_hidden_layers is -2, not a positive whole number"),
        ({"vocab_size": "97"}, "vocab_size is '97', not a positive whole number"),
        ({"intermediate_size": 24.0}, "intermediate_size is 24.0, not a positive whole number"),
        ({"num_attention_heads": True}, "num_attention_heads is True, not a positive whole number"),
        ({"hidden_size": None}, "hidden_size is None, not a positive whole number"),  # present but empty
        ({"head_dim": 0}, "head_dim is 0, not a positive whole number"),
        ({"num_attention_heads": 5}, "num_attention_heads 5 is not a multiple of num_key_value_heads 2"),
        (
            {"num_attention_heads": 7, "num_key_value_heads": 7},
            "hidden_size 48 is not divisible by num_attention_heads 7 and no head_dim is given",
        ),
    ],
)
def test_a_bad_size_is_one_line_naming_the_file_and_the_size(changes, message):
    for config in ({**CONFIG, **changes}, {"model_type": "gemma3", "text_config": {**CONFIG, **changes}}):
        with pytest.raises(AdaPrunerError) as raised:
            check_config(config, "m/config.json")
        assert str(raised.value).startswith("m/config.json: ") and message in str(raised.value)
        assert "\n" not in str(raised.value)


def test_weight_headers_read_every_shape_of_one_file_or_of_its_shards(saved, tmp_path):
    path, shapes = saved
    assert weight_headers(path) == shapes
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    files = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file, metadata={"format": "pt"})
    (tmp_path / "stray.safetensors").write_bytes(b"not read: the index names the shards")
    index = {"weight_map": {n: file for file, part in files.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_headers(tmp_path) == shapes
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(AdaPrunerError, match="b.safetensors, a shard model.safetensors.index.json names, is missing"):
        weight_headers(tmp_path)


def test_weight_files_that_are_missing_or_not_safetensors_are_named(tmp_path):
    with pytest.raises(AdaPrunerError, match=r"holds no \*\.safetensors weights"):
        weight_headers(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(AdaPrunerError, match=r"model\.safetensors is not a whole safetensors file"):
        weight_headers(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(AdaPrunerError, match="is not a safetensors index"):
        weight_headers(tmp_path)


def test_shapes_must_be_the_config_s_and_every_layer_must_be_stored(saved):
    path, shapes = saved
    model = tiny_llama(6, 2)
    check_shapes(model, shapes, path)
    check_shapes(model, {**shapes, "model.extra.weight": (1,)}, path)  # a name the model lacks is not compared
    wrong = {**shapes, "model.layers.1.mlp.up_proj.weight": (32, 48)}
    with pytest.raises(AdaPrunerError, match=r"weight model\.layers\.1\.mlp\.up_proj\.weight is \[32, 48\] but the"):
        check_shapes(model, wrong, path)
    two_layers = {name: shape for name, shape in shapes.items() if ".layers.2." not in name}
    with pytest.raises(AdaPrunerError, match="has no weights for decoder layer 2 \\(it holds 2 layers"):
        check_shapes(model, two_layers, path)


def test_a_tokenizer_file_must_lie_beside_the_model(tmp_path):
    with pytest.raises(AdaPrunerError, match="has no tokenizer"):
        check_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    check_tokenizer(tmp_path)


def test_the_first_non_finite_floating_weight_is_named():
    ints = torch.tensor([1, 2])
    meta = torch.empty(3, device="meta")
    good = torch.ones(2, 2)
    check_finite([("a", good), ("ids", ints), ("m", meta)], "model")
    bad = good.clone()
    bad[1, 0] = float("-inf")
    nan = torch.tensor([float("nan")])
    with pytest.raises(AdaPrunerError) as raised:
        check_finite([("a", good), ("b", bad), ("c", nan)], "m")
    assert str(raised.value) == "m: weight b holds NaN or infinite values: the checkpoint is damaged"
