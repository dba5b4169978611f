"""Pruning groups of a decoder, read from the module tree through its family (`adapruner.model.families`).

A *group* couples the weight slices that must be pruned together. Its *units* are what selection keeps or
removes: key/value groups (a kv head with its query heads) or query heads for attention, channels for the MLP.
Each *member* is one linear whose rows (dim 0) or columns (dim 1) belong to the units in blocks of `block`
consecutive channels from `offset`: unit u owns channels `offset + u*block … offset + (u+1)*block - 1`. A fused
projection is several members of one linear at different offsets (Phi-3's `qkv_proj`: Q rows at 0, K rows at
n_q·head_dim, V rows at (n_q + n_kv)·head_dim).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adapruner.choosing.spec import AttnGranularity
from adapruner.errors import AdaPrunerError
from adapruner.model.families import FAMILIES, Family, family_of, shipped_modeling, text_config

# linears that read another one's input (k/v read q's, up reads gate's): the cache stores that input once
SHARED_INPUT = {
    leaf: inputs[0]
    for family in FAMILIES.values()
    for inputs in (family.attention_inputs, family.mlp_inputs)
    for leaf in inputs[1:]
}
Cut = tuple[nn.Module, str, "torch.Tensor | None", "torch.Tensor | None"]  # owner, module name, kept rows, kept columns
ExpertCut = tuple[nn.Module, str, int, torch.Tensor]  # experts module, parameter name, cut dim, kept indices (E × K)
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # every expert's [gate | up] rows (E × 2I × H) and down (E × H × I)


@dataclass(frozen=True)
class ExpertRows:
    """One role of every expert of a layer as a 2-D weight (unit u = e·I + c: expert e's channel c), for importance:
    the gate or up rows (E·I × H), or the down columns (H × E·I)."""

    weight: torch.Tensor
    bias: None = None


@dataclass(frozen=True)
class Member:
    """One linear of a group: `dim` 0 prunes output rows, 1 prunes input columns, in blocks of `block` from `offset`
    (`span` channels in all: the group's units times `block`)."""

    name: str
    linear: nn.Linear | ExpertRows
    dim: int
    block: int
    offset: int = 0
    span: int | None = None  # None: the whole dimension
    weights_only: bool = False  # MoE experts: no calibration statistics reach them, weight metrics score them

    def channels(self, scores: torch.Tensor) -> torch.Tensor:
        """The member's part of a score vector over the linear's whole dimension."""
        return scores if self.span is None else scores[self.offset : self.offset + self.span]


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
    intermediate: int  # MLP channels (of each expert in a MoE layer)
    family: Family
    experts: nn.Module | None = None  # a MoE layer's experts (3-D weights), None for a dense MLP
    n_experts: int = 0

    @property
    def heads_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else 0

    @property
    def mlp_units(self) -> int:
        """MLP units of the layer: channels, or every expert's channels (unit e·I + c)."""
        return self.intermediate * max(1, self.n_experts)

    @property
    def attn_prefix(self) -> str:
        return f"{self.prefix}.{self.family.attention}"

    @property
    def mlp_prefix(self) -> str:
        return f"{self.prefix}.{self.family.mlp}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a `*ForCausalLM`, where its family keeps them (`model.layers` for most)."""
    owner, leaf = layers_owner(model)
    return getattr(owner, leaf)


def layers_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the decoder layers, the attribute they sit under): `(model.model, "layers")` for most;
    a model without them there is a one-line error."""
    family = family_of(model.config)
    *path, leaf = family.layers.split(".")
    owner = model
    for part in path:
        owner = getattr(owner, part, None)
    if not isinstance(getattr(owner, leaf, None), nn.ModuleList):
        raise AdaPrunerError(f"{type(model).__name__} has no {family.layers}: not a {family.model_type} decoder")
    return owner, leaf


def layer_info(model: nn.Module, index: int) -> LayerInfo:
    """Shapes of layer `index` from its modules: heads = o columns / head_dim, kv heads = k rows / head_dim (of the
    fused qkv: (rows − q rows) / 2), channels = down columns."""
    family = family_of(model.config)
    layer = decoder_layers(model)[index]
    attn, mlp = getattr(layer, family.attention, None), getattr(layer, family.mlp, None)
    experts = getattr(mlp, family.experts, None) if family.experts else None
    mlp_names = () if experts is not None else (*family.mlp_inputs, family.down)
    for owner, names in ((attn, (*family.attention_inputs, family.o)), (mlp, mlp_names)):
        missing = [n for n in names if not isinstance(getattr(owner, n, None), nn.Linear)]
        if missing:
            raise AdaPrunerError(f"layer {index} lacks {', '.join(missing)}: not a {family.model_type} decoder layer")
    head_dim = attn.head_dim
    n_heads = getattr(attn, family.o).in_features // head_dim
    if family.qkv:
        n_kv = (getattr(attn, family.qkv).out_features // head_dim - n_heads) // 2
    else:
        n_kv = getattr(attn, family.k).out_features // head_dim
    return LayerInfo(
        index=index,
        attn=attn,
        mlp=mlp,
        prefix=f"{family.layers}.{index}",
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate=getattr(mlp, family.down).in_features if experts is None else experts.down_proj.shape[2],
        family=family,
        experts=experts,
        n_experts=0 if experts is None else experts.down_proj.shape[0],
    )


def check_context(model: nn.Module, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context (`max_position_embeddings`), in one line."""
    context = getattr(text_config(model.config), "max_position_embeddings", None)
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
        raise AdaPrunerError(
            f"layer range {spec!r} reaches past the model's {n_layers} layers: write START:STOP within 0:{n_layers}"
        )
    chosen = range(n_layers)[start:stop]
    if len(chosen) == 0:
        raise AdaPrunerError(
            f"layer range {spec!r} selects no layer of {n_layers}: write START:STOP within 0:{n_layers}"
        )
    return chosen


def _attention_slots(info: LayerInfo) -> dict[str, tuple[str, int, int]]:
    """Role (q, k, v, o) → (linear name, pruned dim, channel offset) in the layer's attention module."""
    f, hd = info.family, info.head_dim
    if f.qkv:
        q_rows, kv_rows = info.n_heads * hd, info.n_kv_heads * hd
        rows = {"q": (f.qkv, 0, 0), "k": (f.qkv, 0, q_rows), "v": (f.qkv, 0, q_rows + kv_rows)}
    else:
        rows = {"q": (f.q, 0, 0), "k": (f.k, 0, 0), "v": (f.v, 0, 0)}
    return {**rows, "o": (f.o, 1, 0)}


def _mlp_slots(info: LayerInfo) -> dict[str, tuple[str, int, int]]:
    """Role (gate, up, down; up and down for an MLP without a gate) → (linear name, pruned dim, channel offset) in the
    layer's MLP module."""
    f = info.family
    if f.gate_up:
        rows = {"gate": (f.gate_up, 0, 0), "up": (f.gate_up, 0, info.intermediate)}
    elif f.gate:
        rows = {"gate": (f.gate, 0, 0), "up": (f.up, 0, 0)}
    else:  # an MLP of up and down alone
        rows = {"up": (f.up, 0, 0)}
    return {**rows, "down": (f.down, 1, 0)}


def _member(owner: nn.Module, prefix: str, slot: tuple[str, int, int], block: int, n_units: int) -> Member:
    name, dim, offset = slot
    linear = getattr(owner, name)
    span = n_units * block
    return Member(f"{prefix}.{name}", linear, dim, block, offset, None if span == linear.weight.shape[dim] else span)


def attention_group(info: LayerInfo, granularity: AttnGranularity = "kv") -> Group:
    """Attention units of one layer.

    `kv`: unit h = kv head h with query heads h·r … h·r+r-1 (r = heads per kv head; HF's `repeat_kv` order):
    q rows and o columns in blocks of r·head_dim, k and v rows in blocks of head_dim. For MHA (r = 1) this is
    one unit per head. `query`: unit = one query head (q rows, o columns in blocks of head_dim); k/v stay.
    """
    slots, hd, p = _attention_slots(info), info.head_dim, info.attn_prefix
    if granularity == "kv":
        qo, n = info.heads_per_kv * hd, info.n_kv_heads
        blocks = {"q": qo, "k": hd, "v": hd, "o": qo}
        return Group(info.index, "attn", tuple(_member(info.attn, p, slots[r], b, n) for r, b in blocks.items()), n)
    if granularity == "query":
        members = tuple(_member(info.attn, p, slots[r], hd, info.n_heads) for r in ("q", "o"))
        return Group(info.index, "attn", members, info.n_heads)
    raise AdaPrunerError(f"unknown attention granularity {granularity!r}: use kv or query")


def mlp_group(info: LayerInfo) -> Group:
    """MLP channel j: row j of gate and up, column j of down; in a MoE layer unit e·I + c is expert e's channel c
    (its gate and up rows, its down column), read from the experts' weights."""
    if info.experts is not None:
        return _expert_group(info)
    slots, n = _mlp_slots(info), info.intermediate
    return Group(info.index, "mlp", tuple(_member(info.mlp, info.mlp_prefix, slots[r], 1, n) for r in slots), n)


def _expert_group(info: LayerInfo) -> Group:
    n_experts, inter = info.n_experts, info.intermediate
    gate_up, down = (getattr(info.experts, name).detach() for name in EXPERT_WEIGHTS)
    prefix = f"{info.mlp_prefix}.{info.family.experts}"
    rows = {"gate": gate_up[:, :inter], "up": gate_up[:, inter:]}
    members = [
        Member(f"{prefix}.{role}", ExpertRows(weight.reshape(n_experts * inter, -1)), 0, 1, weights_only=True)
        for role, weight in rows.items()
    ]
    columns = ExpertRows(down.permute(1, 0, 2).reshape(down.shape[1], n_experts * inter))
    members.append(Member(f"{prefix}.down", columns, 1, 1, weights_only=True))
    return Group(info.index, "mlp", tuple(members), info.mlp_units)


def has_experts(model: nn.Module, layers) -> bool:
    """Whether any of `layers` keeps its MLP channels in MoE experts."""
    return any(layer_info(model, index).experts is not None for index in layers)


def output_projections(model: nn.Module, layers, attention: bool = True, mlp: bool = True) -> dict[str, nn.Linear]:
    """The attention and MLP output linears of `layers` (of those pruned: `attention`, `mlp`) by module name: the
    ones whose *input* channels pruning removes (and compensation refits)."""
    found: dict[str, nn.Linear] = {}
    for index in layers:
        info = layer_info(model, index)
        f = info.family
        if attention:
            found[f"{info.attn_prefix}.{f.o}"] = getattr(info.attn, f.o)
        if mlp and info.experts is None:  # experts' down weights are 3-D parameters, not linears
            found[f"{info.mlp_prefix}.{f.down}"] = getattr(info.mlp, f.down)
    return found


def prunable_linears(model: nn.Module, layers: range) -> dict[str, nn.Linear]:
    """Every linear that some group of `layers` prunes, by its module name."""
    found: dict[str, nn.Linear] = {}
    for index in layers:
        info = layer_info(model, index)
        for group in (attention_group(info, "kv"), mlp_group(info)):
            found.update({m.name: m.linear for m in group.members if not m.weights_only})
    return found


def projection_names(model: nn.Module) -> tuple[str, ...]:
    """The leaf names of every attention and MLP projection of the model's family (LoRA targets)."""
    f = family_of(model.config)
    return (*f.attention_inputs, f.o, *f.mlp_inputs, f.down)


def input_owner(name: str, present: Collection[str] | None = None) -> str:
    """The linear whose input `name` reads: k/v read q's, up reads gate's (a fused projection reads its own) — where
    that linear is among the `present` ones (None: assumed; an MLP without a gate: up reads its own)."""
    prefix, _, leaf = name.rpartition(".")
    owner = f"{prefix}.{SHARED_INPUT.get(leaf, leaf)}"
    return owner if present is None or owner in present else name


def head_channels(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads: h·head_dim … (h+1)·head_dim - 1 for each h."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def layer_cuts(
    info: LayerInfo, kept_heads: tuple[list[int], list[int]] | None, channels: list[int] | None
) -> list[Cut]:
    """(owner, module name, kept rows, kept columns) of every linear (and norm spanning the heads: rows of its weight)
    that keeping the query and kv heads `kept_heads` and the MLP `channels` shrinks (None: that block stays whole);
    a fused linear's slots are kept in its order."""
    kept: dict[tuple[nn.Module, str], list[list[torch.Tensor]]] = {}

    def keep(owner: nn.Module, slot: tuple[str, int, int], indices: torch.Tensor) -> None:
        name, dim, offset = slot
        kept.setdefault((owner, name), [[], []])[dim].append(indices + offset)

    if kept_heads is not None and (len(kept_heads[0]) < info.n_heads or len(kept_heads[1]) < info.n_kv_heads):
        slots = _attention_slots(info)
        q_rows, kv_rows = (head_channels(heads, info.head_dim) for heads in kept_heads)
        for role, indices in (("q", q_rows), ("k", kv_rows), ("v", kv_rows), ("o", q_rows)):
            keep(info.attn, slots[role], indices)
        for norm, indices in zip(info.family.head_norms or (), (q_rows, kv_rows)):  # norms spanning all heads
            keep(info.attn, (norm, 0, 0), indices)
    if channels is not None and len(channels) < info.intermediate and info.experts is None:
        kept_channels = torch.tensor(channels, dtype=torch.long)
        for slot in _mlp_slots(info).values():
            keep(info.mlp, slot, kept_channels)
    return [
        (owner, name, torch.cat(rows) if rows else None, torch.cat(cols) if cols else None)
        for (owner, name), (rows, cols) in kept.items()
    ]


def expert_cuts(info: LayerInfo, channels: list[int] | None) -> list[ExpertCut]:
    """(experts, parameter name, cut dim, kept indices E × K) of a MoE layer keeping the flat units `channels`
    (e·I + c, each expert the same count): gate rows c and up rows I + c along dim 1, down columns c along dim 2."""
    if info.experts is None or channels is None or len(channels) == info.mlp_units:
        return []
    kept = torch.tensor(channels, dtype=torch.long).view(info.n_experts, -1) % info.intermediate
    gate_up, down = EXPERT_WEIGHTS
    return [(info.experts, gate_up, 1, torch.cat([kept, kept + info.intermediate], 1)), (info.experts, down, 2, kept)]


def resize_modules(info: LayerInfo) -> None:
    """Set the attributes the attention and MLP forwards read to the layer's new sizes (the shipped modeling file's
    `fit_layer`, so that the pruned model in memory runs as the saved one will)."""
    fit = shipped_modeling().fit_layer
    fit(info.attn, info.mlp, info.n_heads, info.n_kv_heads, info.intermediate, info.family.layer_config)


def unit_params(info: LayerInfo) -> tuple[int, int, int]:
    """Parameters of one query head (its q rows with bias, its o columns), one kv head (k and v rows with biases)
    and one MLP channel (gate and up rows with biases — up alone without a gate — and the down column)."""
    hd, slots = info.head_dim, _attention_slots(info)
    q = getattr(info.attn, slots["q"][0])
    k = getattr(info.attn, slots["k"][0])
    hidden = q.in_features
    norms = hd if info.family.head_norms else 0  # q_norm / k_norm entries spanning the heads go with them
    q_head = hd * (2 * hidden + (q.bias is not None)) + norms
    kv_head = 2 * hd * (hidden + (k.bias is not None)) + norms
    if info.experts is not None:  # one unit: a channel of every expert
        return q_head, kv_head, 3 * hidden * info.n_experts
    mlp = _mlp_slots(info)
    inputs = [getattr(info.mlp, mlp[role][0]) for role in ("gate", "up") if role in mlp]  # no gate: up alone
    channel = (len(inputs) + 1) * hidden + sum(linear.bias is not None for linear in inputs)
    return q_head, kv_head, channel


def linear_of(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool = True) -> nn.Linear:
    """An nn.Linear that owns `weight` (out × in) and `bias` without copying them (a removed block's: zero-size)."""
    with warnings.catch_warnings():  # built on the meta device: nothing to initialise
        warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return linear
