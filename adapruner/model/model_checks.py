"""What a local model directory must hold before any weight is read or any work starts, each failure one line naming
the file and the fix: a config that makes a model, weight files that are whole safetensors (every shard an index
names), weight shapes that are the config's, a tokenizer beside the model, and (once loaded) finite weights."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

from adapruner.errors import AdaPrunerError

SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts", "num_local_experts")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")
INDEX = "model.safetensors.index.json"
LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_config(config: Mapping, where: str) -> None:
    """Sizes that make a model, read from the config's dict (of its `text_config` where it has one) before any config
    class sees them: positive whole numbers, query heads a multiple of the kv heads, heads dividing the hidden size
    where `head_dim` is not given. `where` names the config file in the message."""
    sizes = config.get("text_config") or config
    for name in (*SIZES, *OPTIONAL_SIZES):
        value = sizes.get(name)
        if value is None and (name in OPTIONAL_SIZES or name not in sizes):
            continue  # absent: the config class's default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise AdaPrunerError(f"{where}: {name} is {value!r}, not a positive whole number: fix the config")
    heads = sizes.get("num_attention_heads")
    kv = sizes.get("num_key_value_heads") or heads
    if heads and heads % kv:
        raise AdaPrunerError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}: fix the config"
        )
    if heads and sizes.get("head_dim") is None and sizes.get("hidden_size", heads) % heads:
        raise AdaPrunerError(
            f"{where}: hidden_size {sizes['hidden_size']} is not divisible by num_attention_heads {heads} and no "
            "head_dim is given: fix the config"
        )


def weight_headers(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers of `directory` (one file, or the shards its index names);
    a missing, truncated or foreign file is a one-line error naming it."""
    from safetensors import safe_open

    files = _weight_files(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as weights:
                shapes |= {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error type for every damaged header
            raise AdaPrunerError(
                f"{file} is not a whole safetensors file ({str(exc).splitlines()[0]}): copy or download it again"
            ) from None
    return shapes


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError):
            raise AdaPrunerError(f"{index} is not a safetensors index (no weight_map): download it again") from None
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise AdaPrunerError(f"{directory / missing[0]}, a shard {INDEX} names, is missing: download it again")
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise AdaPrunerError(
            f"{directory} holds no *.safetensors weights: save the model with save_pretrained (safetensors) there"
        )
    return files


def check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], directory: Path) -> None:
    """The weights' shapes are those of the model the config describes (tensors both name), and the weights hold every
    decoder layer the config counts. (Names are compared only where both sides use one: transformers renames some
    on load — MoE experts and routers, multimodal towers.)"""
    state = model.state_dict()
    for name, tensor in state.items():
        stored = shapes.get(name)
        if stored is not None and stored != tuple(tensor.shape):
            raise AdaPrunerError(
                f"{directory}: weight {name} is {list(stored)} but the config makes it {list(tensor.shape)}: "
                "the config does not belong to these weights"
            )
    needed, stored = _layer_indices(state), _layer_indices(shapes)
    if stored and needed - stored:
        raise AdaPrunerError(
            f"{directory} has no weights for decoder layer {min(needed - stored)} (it holds {len(stored)} layers, the "
            "config counts more): the config does not belong to these weights, or a weight file is missing"
        )


def _layer_indices(names: Iterable[str]) -> set[int]:
    """The decoder-layer indices that weight names mention (`….layers.<i>.…`)."""
    return {int(match.group(1)) for name in names if (match := LAYER_NAME.search(name))}


def check_tokenizer(directory: Path) -> None:
    """A local model carries its tokenizer files."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise AdaPrunerError(
            f"{directory} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, …): "
            "save the tokenizer beside the model (tokenizer.save_pretrained(DIR))"
        )


def check_finite(named: Iterable[tuple[str, object]], where: str) -> None:
    """Every loaded weight is finite; the first that is not is named."""
    import torch

    for name, tensor in named:
        if tensor.device.type != "meta" and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdaPrunerError(f"{where}: weight {name} holds NaN or infinite values: the checkpoint is damaged")
