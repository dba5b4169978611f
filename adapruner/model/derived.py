"""Families read from a model's structure: a decoder whose `model_type` has no entry in `FAMILIES` is pruned by a
`Family` derived from its modules, or refused in one line that names the reason.

`derive_family(model)` looks, in the model (a meta model built from the config will do), for
  the decoder layers   the `nn.ModuleList` of `num_hidden_layers` modules nearest the root;
  the attention        a layer's `self_attn` / `attention` / `attn` (else its child whose class ends in `Attention`),
                       with separate `q_proj`, `k_proj`, `v_proj` or a fused `qkv_proj`, and `o_proj`, and a
                       `head_dim`; q/k norms over `head_dim` are shared by every head and stay; norms spanning all
                       heads (`head_norms`) are cut with them, which renormalises the kept heads (inexact: heads are
                       pruned only when asked, `check_attention_pruning`); a list of per-head norms is not sliced, so
                       attention pruning is refused for it (`attention_refusal`: MLP pruning stays); an attention
                       forward that reads the head count from the config gets a per-layer view (`layer_config`);
  the MLP              `mlp` / `block_sparse_moe` / `feed_forward` with `gate_proj`, `up_proj`, `down_proj`, a fused
                       `gate_up_proj` and `down_proj`, `up_proj` and `down_proj` alone (no gate), or MoE `experts`
                       holding 3-D `gate_up_proj` / `down_proj` weights.
Refused with the reason: multi-latent attention (a compressed kv projection shared by all heads), hybrid state-space
layers, attention without per-head q/k/v/o projections, an MLP without gate/up/down projections.

`adapruner.cutting.layout_check` verifies a derived family on the model itself before any work.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from adapruner.errors import AdaPrunerError
from adapruner.model.family import Family

ATTENTION_NAMES = ("self_attn", "attention", "attn")
MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward")
MLA_NAMES = ("q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj")
STATE_SPACE = re.compile(r"Mamba|SSM|Mixer|GatedDeltaNet|LinearAttention")  # in a layer's module class names
STATE_SPACE_KINDS = ("mamba", "ssm", "linear_attention", "conv")  # in the config's `layer_types`
HEAD_COUNT_READ = re.compile(r"config\.num_(attention|key_value)_heads")  # in an attention forward's source
STATE_SPACE_REASON = "hybrid state-space (or linear-attention) layers have no heads and channels of the kind pruned"


def derive_family(model: nn.Module) -> Family:
    """The `Family` of `model`'s structure (the module docstring), or a one-line refusal naming the reason. Every
    layer must read alike: a model that mixes dense and MoE layers, or layer kinds, is refused."""
    model_type = model.config.model_type
    text = model.config.get_text_config()
    layers_path, layers = _decoder_layers(model, text.num_hidden_layers, model_type)
    kinds = {str(kind).lower() for kind in getattr(text, "layer_types", None) or ()}
    if kinds & set(STATE_SPACE_KINDS):
        raise _refused(model_type, STATE_SPACE_REASON)
    views = [_layer_view(layer, text, model_type) for layer in layers]
    for index, view in enumerate(views):
        if view != views[0]:
            raise _refused(model_type, f"its layer {index} is built unlike layer 0 (dense and MoE layers mixed?)")
    attention_name, qkv, head_norms, refusal, layer_config, mlp_name, gate, gate_up, moe = views[0]
    return Family(
        model_type,
        type(model.config).__name__,
        type(model).__name__,
        layers=layers_path,
        text_config=text is not model.config,
        attention=attention_name,
        mlp=mlp_name,
        gate=gate,
        qkv=qkv,
        gate_up=gate_up,
        head_norms=head_norms,
        layer_config=layer_config,
        experts="experts" if moe else None,
        expert_size="moe_intermediate_size"
        if moe and getattr(text, "moe_intermediate_size", None)
        else ("intermediate_size"),
        derived=True,
        attention_refusal=refusal,
    )


def _layer_view(layer: nn.Module, text, model_type: str) -> tuple:
    """What one decoder layer's structure gives: (attention name, fused qkv, spanning norms, attention refusal, head
    count read from the config, MLP name, gate, fused gate_up, MoE)."""
    if STATE_SPACE.search(" ".join(type(module).__name__ for module in layer.modules())):
        raise _refused(model_type, STATE_SPACE_REASON)
    attention_name, attention = _attention(layer, model_type)
    qkv = _attention_projections(attention, model_type)
    head_norms, refusal = _head_norms(attention, model_type)
    mlp_name, mlp = _mlp(layer, model_type)
    moe = _has_experts(mlp, text.hidden_size, model_type)
    gate, gate_up = _mlp_projections(mlp, model_type) if not moe else ("gate_proj", None)
    return attention_name, qkv, head_norms, refusal, _reads_head_count(attention), mlp_name, gate, gate_up, moe


def _reads_head_count(attention: nn.Module) -> bool:
    """Whether the attention's forward reads the head count from the config (Phi-3 reshapes by
    `config.num_attention_heads`), so each pruned layer needs its own view of it; where the source cannot be read,
    the view is given (it is right either way)."""
    try:
        source = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return True
    return HEAD_COUNT_READ.search(source) is not None


def _has_experts(mlp: nn.Module, hidden: int, model_type: str) -> bool:
    """Whether the MLP keeps its experts as transformers 5 does: `experts.gate_up_proj` [E, 2I, H] (gate rows first)
    and `experts.down_proj` [E, H, I], no expert biases; other 3-D layouts are refused."""
    experts = getattr(mlp, "experts", None)
    if experts is None or isinstance(experts, nn.ModuleList):
        return False
    gate_up, down = (getattr(experts, name, None) for name in ("gate_up_proj", "down_proj"))
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    n, width = gate_up.shape[0], down.shape[-1] if down.dim() == 3 else -1
    laid_out = gate_up.dim() == 3 and gate_up.shape[1:] == (2 * width, hidden) and down.shape == (n, hidden, width)
    biased = any(isinstance(p, nn.Parameter) and "bias" in name for name, p in experts.named_parameters())
    if not laid_out or biased:
        raise _refused(
            model_type,
            f"its experts are stored as gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)}"
            f"{' with biases' if biased else ''}, not [E, 2I, H] and [E, H, I]",
        )
    return True


def _decoder_layers(model: nn.Module, count: int, model_type: str) -> tuple[str, nn.ModuleList]:
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count and count > 0
    ]
    if not found:
        raise _refused(model_type, f"no list of its {count} decoder layers in the model")
    return min(found, key=lambda item: item[0].count("."))


def _attention(layer: nn.Module, model_type: str) -> tuple[str, nn.Module]:
    for name in ATTENTION_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name, getattr(layer, name)
    for name, child in layer.named_children():
        if type(child).__name__.endswith("Attention"):
            return name, child
    raise _refused(model_type, "its decoder layer has no attention module adapruner can find")


def _attention_projections(attention: nn.Module, model_type: str) -> str | None:
    """None for separate q/k/v projections, `qkv_proj` for a fused one."""
    if any(hasattr(attention, name) for name in MLA_NAMES):
        raise _refused(
            model_type, "multi-latent attention (its heads share a compressed key/value projection) is not separable"
        )
    linear = lambda name: isinstance(getattr(attention, name, None), nn.Linear)  # noqa: E731
    if not linear("o_proj") or not (all(map(linear, ("q_proj", "k_proj", "v_proj"))) or linear("qkv_proj")):
        names = ", ".join(name for name, child in attention.named_children() if isinstance(child, nn.Linear))
        raise _refused(model_type, f"its attention has no per-head q/k/v/o projections ({names or 'no linears'})")
    if not isinstance(getattr(attention, "head_dim", None), int):
        raise _refused(model_type, "its attention states no head_dim")
    return None if linear("q_proj") else "qkv_proj"


def _head_norms(attention: nn.Module, model_type: str) -> tuple[tuple[str, str] | None, str | None]:
    """(q and k norms spanning all heads, cut with them; why attention pruning cannot be done, or None)."""
    spanning = []
    for name, child in attention.named_children():
        if "norm" not in name.lower():
            continue
        if isinstance(child, nn.ModuleList) or any(isinstance(c, nn.ModuleList) for c in child.children()):
            return None, (
                f"{model_type}'s attention keeps one {name} per head (a list), which a cut does not slice: "
                "pass --no-attention (MLP pruning is exact)"
            )
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() != attention.head_dim:
            spanning.append(name)
    if not spanning:
        return None, None
    if len(spanning) != 2:
        return None, f"{model_type}'s attention norm {spanning[0]} spans its heads: pass --no-attention"
    return tuple(spanning), None  # cut with the heads: inexact, pruned when asked (`check_attention_pruning`)


def _mlp(layer: nn.Module, model_type: str) -> tuple[str, nn.Module]:
    for name in MLP_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name, getattr(layer, name)
    raise _refused(model_type, "its decoder layer has no MLP module adapruner can find")


def _mlp_projections(mlp: nn.Module, model_type: str) -> tuple[str | None, str | None]:
    """(gate name or None: no gate, fused gate_up name or None)."""
    linear = lambda name: isinstance(getattr(mlp, name, None), nn.Linear)  # noqa: E731
    if linear("down_proj"):
        if linear("gate_proj") and linear("up_proj"):
            return "gate_proj", None
        if linear("gate_up_proj"):
            return "gate_proj", "gate_up_proj"
        if linear("up_proj"):
            return None, None
    names = ", ".join(name for name, child in mlp.named_children() if isinstance(child, nn.Linear))
    raise _refused(model_type, f"its MLP has no gate/up/down projections ({names or 'no linears'})")


def _refused(model_type: str, reason: str) -> AdaPrunerError:
    return AdaPrunerError(f"unsupported architecture {model_type!r}: {reason}, so adapruner cannot prune it")
