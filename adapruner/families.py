"""The model-family layer: for each supported `model_type`, where a decoder keeps what pruning touches.

A `Family` names the decoder layers' path, the attention and MLP modules of a layer and their projections, and says
which projections are fused (Phi-3's `qkv_proj` holds [Q | K | V] rows, `gate_up_proj` holds [gate | up] rows).
`adapruner.structure` turns it into pruning groups and cuts; no other module names a projection.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapruner.errors import AdaPrunerError


@dataclass(frozen=True)
class Family:
    """Where one transformers family keeps its prunable parts.

    `class_prefix`: transformers' class-name prefix (`Llama` → `LlamaConfig`, `LlamaForCausalLM`); `layers`: the
    dotted path from the `*ForCausalLM` to the decoder layers; `qkv` / `gate_up`: the fused projection's name where
    the family fuses them (then `q, k, v` / `gate, up` are unused)."""

    model_type: str
    class_prefix: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    qkv: str | None = None
    gate_up: str | None = None

    @property
    def attention_inputs(self) -> tuple[str, ...]:
        """The linears that read the attention block's input (one when fused)."""
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)

    @property
    def mlp_inputs(self) -> tuple[str, ...]:
        """The linears that read the MLP block's input (one when fused)."""
        return (self.gate_up,) if self.gate_up else (self.gate, self.up)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama"),
        Family("mistral", "Mistral"),
        Family("qwen2", "Qwen2"),
    )
}
SUPPORTED_TYPES = tuple(FAMILIES)


def model_type_of(config) -> str:
    """The family's `model_type` of a config (a pruned model's `base_model_type`)."""
    return getattr(config, "base_model_type", None) or getattr(config, "model_type", "")


def check_supported(config) -> None:
    """Raise a one-line error for architectures whose layout we do not know."""
    model_type = model_type_of(config)
    if model_type not in FAMILIES:
        raise AdaPrunerError(
            f"unsupported architecture {model_type!r}: adapruner prunes {', '.join(SUPPORTED_TYPES)} decoders"
        )


def family_of(config) -> Family:
    """The `Family` of a model's config; an unknown one is a one-line error listing the supported families."""
    check_supported(config)
    return FAMILIES[model_type_of(config)]
