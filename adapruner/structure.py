"""Pruning groups of LLaMA-family decoders, read from the module tree and the config (nothing hard-coded).

A *group* couples the weight slices that must be pruned together. Its *units* are what selection keeps or
removes: key/value groups (a kv head with its query heads) or query heads for attention, channels for the MLP.
Each *member* is one linear whose rows (dim 0) or columns (dim 1) belong to the units in blocks of `block`
consecutive channels: unit u owns channels `u*block … (u+1)*block - 1` of that dimension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adapruner.errors import AdaPrunerError
from adapruner.spec import AttnGranularity

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}  # model_type → HF class-name prefix
SUPPORTED_TYPES = tuple(FAMILIES)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # linears that read another one's input


@dataclass(frozen=True)
class Member:
    """One linear of a group: `dim` 0 prunes output rows, 1 prunes input columns, in blocks of `block`."""

    name: str
    linear: nn.Linear
    dim: int
    block: int


@dataclass(frozen=True)
class Group:
    """The prunable units of one block of one layer; `members[0]` is the group's root (aggregation `first`)."""

    layer: int
    kind: Literal["attn", "mlp"]
    members: tuple[Member, ...]
    n_units: int


@dataclass(frozen=True)
class LayerInfo:
    """The shapes of one decoder layer as it is now (after any earlier pruning)."""

    index: int
    attn: nn.Module
    mlp: nn.Module
    prefix: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def heads_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads


def check_supported(config) -> None:
    """Raise a one-line error for architectures whose layout we do not know."""
    model_type = getattr(config, "base_model_type", None) or getattr(config, "model_type", "")
    if model_type not in SUPPORTED_TYPES:
        raise AdaPrunerError(
            f"unsupported architecture {model_type!r}: adapruner prunes {', '.join(SUPPORTED_TYPES)} decoders (LLaMA family)"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a `*ForCausalLM` (`model.model.layers`)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise AdaPrunerError(f"{type(model).__name__} has no model.layers: adapruner prunes LLaMA-family decoders")
    return layers


def layer_info(model: nn.Module, index: int) -> LayerInfo:
    """Shapes of layer `index` from its modules: heads = q rows / head_dim, kv heads = k rows / head_dim."""
    layer = decoder_layers(model)[index]
    attn, mlp = layer.self_attn, layer.mlp
    for owner, names in ((attn, ATTENTION_PROJECTIONS), (mlp, MLP_PROJECTIONS)):
        missing = [n for n in names if not isinstance(getattr(owner, n, None), nn.Linear)]
        if missing:
            raise AdaPrunerError(f"layer {index} lacks {', '.join(missing)}: adapruner prunes LLaMA-family decoders")
    head_dim = attn.head_dim
    return LayerInfo(
        index=index,
        attn=attn,
        mlp=mlp,
        prefix=f"model.layers.{index}",
        n_heads=attn.q_proj.out_features // head_dim,
        n_kv_heads=attn.k_proj.out_features // head_dim,
        head_dim=head_dim,
        intermediate=mlp.gate_proj.out_features,
    )


def check_context(model: nn.Module, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context (`max_position_embeddings`), in one line."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise AdaPrunerError(f"{flag} {seq_len} exceeds the model's context of {context} tokens: use at most {context}")


def default_layer_range(n_layers: int) -> range:
    """LLM-Pruner's default scaled to depth: keep the first 4/32 and the last 2/32 of the layers whole."""
    first, last = round(n_layers * 4 / 32), round(n_layers * 2 / 32)
    return range(first, n_layers - last)


def parse_layer_range(spec: str | None, n_layers: int) -> range:
    """`None` → default; `"a:b"` → layers a … b-1 (Python slice, negatives allowed); `"all"` → every layer."""
    if spec is None:
        return default_layer_range(n_layers)
    if spec == "all":
        return range(n_layers)
    try:
        start_text, stop_text = spec.split(":")
        start = int(start_text) if start_text else 0
        stop = int(stop_text) if stop_text else n_layers
    except ValueError:
        raise AdaPrunerError(f"bad layer range {spec!r}: write START:STOP (e.g. 4:28) or all") from None
    if not all(-n_layers <= bound <= n_layers for bound in (start, stop)):
        raise AdaPrunerError(f"layer range {spec!r} reaches past the model's {n_layers} layers: write START:STOP within 0:{n_layers}")
    chosen = range(n_layers)[start:stop]
    if len(chosen) == 0:
        raise AdaPrunerError(f"layer range {spec!r} selects no layer of {n_layers}: write START:STOP within 0:{n_layers}")
    return chosen


def attention_group(info: LayerInfo, granularity: AttnGranularity = "kv") -> Group:
    """Attention units of one layer.

    `kv`: unit h = kv head h with query heads h·r … h·r+r-1 (r = heads per kv head; HF's `repeat_kv` order):
    q rows and o columns in blocks of r·head_dim, k and v rows in blocks of head_dim. For MHA (r = 1) this is
    one unit per head. `query`: unit = one query head (q rows, o columns in blocks of head_dim); k/v stay.
    """
    a, p, hd = info.attn, f"{info.prefix}.self_attn", info.head_dim
    if granularity == "kv":
        qo_block = info.heads_per_kv * hd
        members = (
            Member(f"{p}.q_proj", a.q_proj, 0, qo_block),
            Member(f"{p}.k_proj", a.k_proj, 0, hd),
            Member(f"{p}.v_proj", a.v_proj, 0, hd),
            Member(f"{p}.o_proj", a.o_proj, 1, qo_block),
        )
        return Group(info.index, "attn", members, info.n_kv_heads)
    if granularity == "query":
        members = (Member(f"{p}.q_proj", a.q_proj, 0, hd), Member(f"{p}.o_proj", a.o_proj, 1, hd))
        return Group(info.index, "attn", members, info.n_heads)
    raise AdaPrunerError(f"unknown attention granularity {granularity!r}: use kv or query")


def mlp_group(info: LayerInfo) -> Group:
    """MLP channel j: row j of gate and up, column j of down."""
    m, p = info.mlp, f"{info.prefix}.mlp"
    members = (
        Member(f"{p}.gate_proj", m.gate_proj, 0, 1),
        Member(f"{p}.up_proj", m.up_proj, 0, 1),
        Member(f"{p}.down_proj", m.down_proj, 1, 1),
    )
    return Group(info.index, "mlp", members, info.intermediate)


def output_projections(model: nn.Module, layers) -> dict[str, nn.Linear]:
    """o_proj and down_proj of `layers` by module name: the linears whose *input* channels pruning removes."""
    found: dict[str, nn.Linear] = {}
    for index in layers:
        info = layer_info(model, index)
        found[f"{info.prefix}.self_attn.{ATTENTION_PROJECTIONS[-1]}"] = info.attn.o_proj
        found[f"{info.prefix}.mlp.{MLP_PROJECTIONS[-1]}"] = info.mlp.down_proj
    return found


def prunable_linears(model: nn.Module, layers: range) -> dict[str, nn.Linear]:
    """Every linear that some group of `layers` prunes, by its module name."""
    found: dict[str, nn.Linear] = {}
    for index in layers:
        info = layer_info(model, index)
        for group in (attention_group(info, "kv"), mlp_group(info)):
            found.update({m.name: m.linear for m in group.members})
    return found


def head_channels(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads: h·head_dim … (h+1)·head_dim - 1 for each h."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
