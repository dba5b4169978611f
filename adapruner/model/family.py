"""`Family`: where one decoder family keeps what pruning touches (declared in `adapruner.model.families`, or derived
from a model's structure by `adapruner.model.derived`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Where one transformers family keeps its prunable parts.

    `config_class` / `model_class`: transformers' class names; `layers`: the dotted path from the model to the decoder
    layers; `text_config`: the sizes live in `config.text_config` (multimodal Gemma-3); `qkv` / `gate_up`: the fused
    projection's name where the family fuses them (then `q, k, v` / `gate, up` are unused); `head_norms`: norms of
    the attention whose weights span all heads and are cut with them (`q_norm`, `k_norm`; the kept heads are then
    renormalised, so heads are pruned only when asked); `layer_config`: the attention forward reads the head count
    from the config (Phi-3), so each pruned layer gets a view of the config with its own count; `experts`: the MLP's
    submodule holding every expert's weights as 3-D parameters (`gate_up_proj` [E, 2I, H] with gate rows first,
    `down_proj` [E, H, I]), `expert_size` the config key of I."""

    model_type: str
    config_class: str
    model_class: str
    layers: str = "model.layers"
    text_config: bool = False
    attention: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str | None = "gate_proj"  # None: an MLP of up and down alone (no gate)
    up: str = "up_proj"
    down: str = "down_proj"
    qkv: str | None = None
    gate_up: str | None = None
    head_norms: tuple[str, str] | None = None
    layer_config: bool = False
    experts: str | None = None
    expert_size: str = "intermediate_size"
    derived: bool = False  # read from the model's structure (`adapruner.model.derived`), not declared
    attention_refusal: str | None = None  # why heads cannot be cut in this layout (None: they can)

    @property
    def attention_inputs(self) -> tuple[str, ...]:
        """The linears that read the attention block's input (one when fused)."""
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)

    @property
    def mlp_inputs(self) -> tuple[str, ...]:
        """The linears that read the MLP block's input (one when fused)."""
        if self.gate_up:
            return (self.gate_up,)
        return (self.gate, self.up) if self.gate else (self.up,)
