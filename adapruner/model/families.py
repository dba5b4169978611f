"""The model-family layer: for each supported `model_type`, where a decoder keeps what pruning touches.

A `Family` names the decoder layers' path, the attention and MLP modules of a layer and their projections, and says
which projections are fused (Phi-3's `qkv_proj` holds [Q | K | V] rows, `gate_up_proj` holds [gate | up] rows).
`adapruner.model.structure` turns it into pruning groups and cuts; no other module names a projection. The saved
model's modeling file (`remote_code/modeling_pruned.py`, which runs without adapruner) keeps the same facts for
rebuilding each family's layers at their pruned sizes.

Norms that ride with the heads: `q_norm`/`k_norm` over `head_dim` (Qwen3, Gemma-3) are shared by all heads and stay
as they are; OLMo-2's span all heads (`head_norms`) and lose the removed heads' entries — its RMS is then
taken over the kept heads only, so removing an OLMo-2 head is not the same as zeroing it: its heads are pruned only
when asked (`check_attention_pruning`, --inexact-heads).

MoE families (Mixtral, Qwen3-MoE, Qwen2-MoE) keep their experts as 3-D parameters: MLP channels are cut inside every
expert, each expert keeping its own channels and every expert of a layer the same number (the tensors stay 3-D);
the router, the expert count and Qwen2-MoE's shared expert stay whole.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import weakref
from pathlib import Path
from types import ModuleType

import torch

from adapruner.errors import AdaPrunerError
from adapruner.model.derived import derive_family
from adapruner.model.family import Family

REMOTE_CODE = Path(__file__).parents[1] / "remote_code" / "modeling_pruned.py"


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
FAMILY_FIELDS = {field.name for field in dataclasses.fields(Family)}


def model_type_of(config) -> str:
    """The family's `model_type` of a config (a pruned model's `base_model_type`)."""
    return getattr(config, "base_model_type", None) or getattr(config, "model_type", "")


def check_supported(config) -> None:
    """Raise a one-line error for architectures whose layout we neither declare nor derive (`family_of`)."""
    family_of(config)


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
    """The `Family` of a model's config: declared (`FAMILIES`), carried by a pruned model's config
    (`adapruner_layout`), or derived once per distinct config from the structure of the model it describes (built on
    the meta device: no weights; `adapruner.model.derived`), or a one-line refusal naming the reason."""
    model_type = model_type_of(config)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    held = _DERIVED_FOR.get(id(config))
    if held is not None and held[0]() is config:
        return held[1]
    layout = getattr(config, "adapruner_layout", None)  # a pruned model of a derived family carries its layout
    if layout is not None:
        known = {name: value for name, value in layout.items() if name in FAMILY_FIELDS}  # a newer version's extras
        family = Family(**{**known, "head_norms": tuple(known["head_norms"]) if known.get("head_norms") else None})
    else:
        text = config.to_json_string(use_diff=False)  # a layout can hang on a flag (StableLM's qk_layernorm)
        if text not in DERIVED:
            DERIVED[text] = derive_family(_meta_model(config, model_type))
        family = DERIVED[text]
    key = id(config)
    _DERIVED_FOR[key] = (weakref.ref(config, lambda _dead: _DERIVED_FOR.pop(key, None)), family)
    return family


def check_attention_pruning(config, prune_attention: bool, inexact_heads: bool = False) -> None:
    """Refuse attention pruning in one line where the family's layout cannot cut heads (`Family.attention_refusal`),
    or where its q/k norms span all heads (OLMo-2, OLMo-3, OLMoE: removing a head renormalises the kept ones, so it
    is not the same as zeroing it) unless `inexact_heads` (--inexact-heads) asks for it."""
    if not prune_attention:
        return
    family = family_of(config)
    if family.attention_refusal:
        raise AdaPrunerError(family.attention_refusal)
    if family.head_norms and not inexact_heads:
        raise AdaPrunerError(
            f"{family.model_type}'s {' and '.join(family.head_norms)} span all heads, so removing a head renormalises "
            "the kept ones (not the same as zeroing it): pass --no-attention (MLP pruning is exact), or "
            "--inexact-heads to prune heads anyway"
        )


DERIVED: dict[str, Family] = {}  # a config's JSON → the family derived from its structure, this process
_DERIVED_FOR: dict[int, tuple[weakref.ref, Family]] = {}  # id(config) → (the config, its family), carried or derived


def _meta_model(config, model_type: str):
    """The causal LM `config` describes, on the meta device; a config transformers has no causal LM for is refused."""
    from transformers import AutoModelForCausalLM

    remote = type(config).__module__.startswith("transformers_modules")  # its code was trusted to read the config
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    except Exception as exc:  # any failure to build it is the same refusal
        raise AdaPrunerError(
            f"unsupported architecture {model_type!r}: transformers has no causal LM class for it "
            f"({str(exc).splitlines()[0][:120]}); adapruner declares {', '.join(SUPPORTED_TYPES)} and derives others "
            "from their structure"
        ) from None
