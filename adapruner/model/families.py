"""The model-family layer: for each supported `model_type`, where a decoder keeps what pruning touches.

A `Family` names the decoder layers' path, the attention and MLP modules of a layer and their projections, and says
which projections are fused (Phi-3's `qkv_proj` holds [Q | K | V] rows, `gate_up_proj` holds [gate | up] rows).
`adapruner.model.structure` turns it into pruning groups and cuts; no other module names a projection. The saved
model's modeling file (`remote_code/modeling_pruned.py`, which runs without adapruner) keeps the same facts for
rebuilding each family's layers at their pruned sizes.

Norms that ride with the heads: `q_norm`/`k_norm` over `head_dim` (Qwen3, Gemma-3) are shared by all heads and stay
as they are; OLMo-2's span all heads (`head_norms="sliced"`) and lose the removed heads' entries — its RMS is then
taken over the kept heads only, so removing an OLMo-2 head is not the same as zeroing it.

MoE families (Mixtral, Qwen3-MoE, Qwen2-MoE) keep their experts as 3-D parameters: MLP channels are cut inside every
expert, each expert keeping its own channels and every expert of a layer the same number (the tensors stay 3-D);
the router, the expert count and Qwen2-MoE's shared expert stay whole.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from adapruner.errors import AdaPrunerError

REMOTE_CODE = Path(__file__).parents[1] / "remote_code" / "modeling_pruned.py"


@dataclass(frozen=True)
class Family:
    """Where one transformers family keeps its prunable parts.

    `config_class` / `model_class`: transformers' class names; `layers`: the dotted path from the model to the decoder
    layers; `text_config`: the sizes live in `config.text_config` (multimodal Gemma-3); `qkv` / `gate_up`: the fused
    projection's name where the family fuses them (then `q, k, v` / `gate, up` are unused); `head_norms`: norms of
    the attention whose weights span all heads and are cut with them (`q_norm`, `k_norm`); `layer_config`: the
    attention forward reads the head count from the config (Phi-3), so each pruned layer gets a view of the config
    with its own count; `experts`: the MLP's submodule holding every expert's weights as 3-D parameters
    (`gate_up_proj` [E, 2I, H] with gate rows first, `down_proj` [E, H, I]), `expert_size` the config key of I."""

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
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    qkv: str | None = None
    gate_up: str | None = None
    head_norms: tuple[str, str] | None = None
    layer_config: bool = False
    experts: str | None = None
    expert_size: str = "intermediate_size"

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
        Family("llama", "LlamaConfig", "LlamaForCausalLM"),
        Family("mistral", "MistralConfig", "MistralForCausalLM"),
        Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
        Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
        Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM"),
        Family("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM"),
        Family(
            "gemma3", "Gemma3Config", "Gemma3ForConditionalGeneration", "model.language_model.layers", text_config=True
        ),
        Family("phi3", "Phi3Config", "Phi3ForCausalLM", qkv="qkv_proj", gate_up="gate_up_proj", layer_config=True),
        Family("granite", "GraniteConfig", "GraniteForCausalLM"),
        Family("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM"),
        Family("glm4", "Glm4Config", "Glm4ForCausalLM", gate_up="gate_up_proj"),
        Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", head_norms=("q_norm", "k_norm")),
        Family("mixtral", "MixtralConfig", "MixtralForCausalLM", experts="experts"),
        Family(
            "qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", experts="experts", expert_size="moe_intermediate_size"
        ),
        Family(
            "qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", experts="experts", expert_size="moe_intermediate_size"
        ),
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


@functools.cache
def shipped_modeling() -> ModuleType:
    """The modeling file saved beside every pruned model (`REMOTE_CODE`), loaded once as this package's own."""
    spec = importlib.util.spec_from_file_location("adapruner_modeling_pruned", REMOTE_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_config(config):
    """The config that holds the decoder's sizes (`text_config` of a multimodal Gemma-3, else the config itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_of(config) -> Family:
    """The `Family` of a model's config; an unknown one is a one-line error listing the supported families."""
    check_supported(config)
    return FAMILIES[model_type_of(config)]
