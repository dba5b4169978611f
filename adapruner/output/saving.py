"""Save pruned models in a format transformers loads: safetensors weights, tokenizer, config, modeling file.

Layers of different sizes → `config.json` holds per-layer head and channel counts and `auto_map` points to
`modeling_pruned.py` (copied beside the weights), loadable with `trust_remote_code=True`. Layers of one size
(`stock_config=True`) → a stock config that loads without remote code; layers whose attention and MLP were both
removed (no heads, no channels, no bias: they pass their input through) are left out of it, so a model that lost
whole layers and kept the others at one size saves as the stock model with fewer layers. Everything is written to a
temporary directory next to `out_dir`, then renamed: a failed save leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from adapruner.choosing.allocation import count_params
from adapruner.cutting.compensation import give_output_biases
from adapruner.errors import AdaPrunerError
from adapruner.model.families import REMOTE_CODE, Family, family_of, text_config
from adapruner.model.structure import decoder_layers, layer_info
from adapruner.output.model_card import model_card
from adapruner.staging import staged_dir


def layer_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Per-layer query heads, kv heads and MLP channels of the model as it is now."""
    infos = [layer_info(model, i) for i in range(len(decoder_layers(model)))]
    return {
        "num_attention_heads_per_layer": [i.n_heads for i in infos],
        "num_key_value_heads_per_layer": [i.n_kv_heads for i in infos],
        "intermediate_size_per_layer": [i.intermediate for i in infos],
    }


def _write_json_files(directory: Path, extra_json: Mapping[str, dict] | None) -> None:
    for name, payload in (extra_json or {}).items():
        (directory / name).write_text(json.dumps(payload, indent=2) + "\n")


def save_pruned(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    stock_config: bool = False,
    extra_json: Mapping[str, dict] | None = None,
    uniform: bool | None = None,
) -> Path:
    """Write the model to `out_dir` (which must not hold anything), with `extra_json` files (name → dict) beside it.
    `uniform` is the old spelling of `stock_config`, kept for one release."""
    if uniform is not None:
        warnings.warn("save_pruned(uniform=...) is now save_pruned(stock_config=...)", DeprecationWarning, stacklevel=2)
        stock_config = uniform
    output_bias = give_output_biases(model)
    if stock_config and output_bias:
        raise AdaPrunerError(
            "--stock-config saves a stock config, which has no o_proj/down_proj biases for compensation: "
            "drop --stock-config or --compensate"
        )
    removed = removed_layers(model) if stock_config else []
    if removed and len(removed) == len(decoder_layers(model)):
        raise AdaPrunerError("every decoder layer was removed: lower --target-params")
    sizes = {key: [v for i, v in enumerate(values) if i not in removed] for key, values in layer_sizes(model).items()}
    if stock_config and any(len(set(values)) > 1 for values in sizes.values()):
        raise AdaPrunerError(
            "--stock-config needs equal sizes in every layer it keeps: prune all layers (--layers all) with one ratio"
        )
    with staged_dir(out_dir) as staging, layers_left_out(model, removed):
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        family = family_of(model.config)
        text = config["text_config"] if family.text_config else config  # where the decoder's sizes live
        if stock_config:
            text.update(_uniform_config(sizes, model))
        else:
            config.update(_remote_code_config(family, sizes, output_bias))
            text["head_dim"] = _head_dim(model)
        if not stock_config:
            shutil.copy(REMOTE_CODE, staging / REMOTE_CODE.name)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if stock_config:
            _check_stock_shapes(model, staging, family)
        _write_json_files(staging, extra_json)
        (staging / "README.md").write_text(
            model_card(count_params(model), extra_json or {}, remote_code=not stock_config)
        )
    return Path(out_dir)


def _check_stock_shapes(model: nn.Module, staging: Path, family: Family) -> None:
    """The stock class built from the saved config holds the pruned model's shapes (StableLM and Helium build o_proj
    from hidden_size, not the head count): else one line, nothing written."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(staging))
    ours = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    for name, tensor in stock.state_dict().items():
        if name in ours and tuple(tensor.shape) != ours[name]:
            raise AdaPrunerError(
                f"--stock-config: {family.model_type}'s stock class builds {name} as {tuple(tensor.shape)}, not the "
                f"pruned {ours[name]}: drop --stock-config (the saved modeling file reloads every size)"
            )


def removed_layers(model: nn.Module) -> list[int]:
    """Decoder layers with no attention heads and no MLP channels left (identities: biases are checked by the
    caller). Experts have no zero width, so MoE layers are never among them."""
    infos = [layer_info(model, i) for i in range(len(decoder_layers(model)))]
    return [i for i, info in enumerate(infos) if info.n_heads == 0 and info.intermediate == 0 and info.experts is None]


@contextmanager
def layers_left_out(model: nn.Module, removed: list[int]):
    """`model` without decoder layers `removed` (its config's layer count and layer types with it) for the duration
    of the block; put back as it was afterwards."""
    if not removed:
        yield
        return
    layers, config = decoder_layers(model), text_config(model.config)
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) not in (None, 1):
        raise AdaPrunerError(
            "this model mixes dense and MoE layers by index (mlp_only_layers, decoder_sparse_step), which leaving "
            "layers out would shift: drop --stock-config"
        )
    original, count, types = list(layers), config.num_hidden_layers, getattr(config, "layer_types", None)
    try:
        for index in reversed(removed):
            del layers[index]
        config.num_hidden_layers = len(layers)
        if types is not None:
            config.layer_types = [t for i, t in enumerate(types) if i not in removed]
        yield
    finally:
        while len(layers):
            del layers[-1]
        layers.extend(original)
        config.num_hidden_layers = count
        if types is not None:
            config.layer_types = types


def save_adapter(
    peft_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    extra_json: Mapping[str, dict] | None = None,
) -> Path:
    """Write a LoRA adapter in peft's own format (`PeftModel.from_pretrained(base, out_dir)` loads it)."""
    with staged_dir(out_dir) as staging:
        peft_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_json_files(staging, extra_json)
    return Path(out_dir)


def _head_dim(model: nn.Module) -> int:
    return layer_info(model, 0).head_dim


def _uniform_config(sizes: dict[str, list[int]], model: nn.Module) -> dict:
    hidden, heads = text_config(model.config).hidden_size, sizes["num_attention_heads_per_layer"][0]
    if hidden % heads:
        raise AdaPrunerError(
            f"--stock-config: transformers' config wants hidden_size {hidden} divisible by the {heads} heads left: "
            "drop --stock-config (remote-code save) or pick another ratio"
        )
    return {
        "num_attention_heads": sizes["num_attention_heads_per_layer"][0],
        "num_key_value_heads": sizes["num_key_value_heads_per_layer"][0],
        **{key: sizes["intermediate_size_per_layer"][0] for key in _mlp_size_keys(model)},
        "head_dim": _head_dim(model),
    }


def _mlp_size_keys(model: nn.Module) -> set[str]:
    """The config keys of the MLP width: `intermediate_size` for dense layers, the family's expert size for MoE ones."""
    layers = range(len(decoder_layers(model)))
    moe = [layer_info(model, i).experts is not None for i in layers]
    return {
        key
        for key, present in (("intermediate_size", not all(moe)), (family_of(model.config).expert_size, any(moe)))
        if present
    }


def _remote_code_config(family: Family, sizes: dict[str, list[int]], output_bias: bool = False) -> dict:
    """Config keys that point at `modeling_pruned.py`, the modeling file shipped beside the weights."""
    config_class, model_class = f"Pruned{family.config_class}", f"Pruned{family.model_class}"
    return {
        **sizes,
        **({"adapruner_layout": asdict(family)} if family.derived else {}),  # the modeling file has no row for it
        "output_bias": output_bias,
        "model_type": f"pruned_{family.model_type}",
        "base_model_type": family.model_type,
        "architectures": [model_class],
        "auto_map": {
            "AutoConfig": f"modeling_pruned.{config_class}",
            "AutoModelForCausalLM": f"modeling_pruned.{model_class}",
        },
    }
