"""Which llama.cpp architecture computes a family's decoder, and what its graph reads (`architecture_of`).

Per family: the GGUF architecture for layers of one size; whether llama.cpp rotates interleaved pairs where
transformers rotates halves (q/k rows are then permuted); which q/k/v biases, q/k norms, layer norms (and under which
names) and scalars its graph reads; whether its loader sizes the attention by the hidden width (heads cannot be
pruned); and the architecture that takes per-layer widths and output-projection biases (`deci`, for the llama layout),
if any. Every llama.cpp loader but `deci`'s sizes its tensors by layer 0's counts, so per-layer widths go out only as
`deci`. What a family's graph cannot compute is a one-line error naming what to pass. Measured against
llama-cpp-python 0.3.36 (tests/test_export.py: logits equal to transformers' within 1e-3 on tiny random models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapruner.errors import AdaPrunerError
from adapruner.model.family import Family

Norm = tuple[str, str, str]  # (block: "attn" or "ffn", GGUF name, the decoder layer's attribute)
PRE_NORMS: tuple[Norm, ...] = (
    ("attn", "attn_norm", "input_layernorm"),
    ("ffn", "ffn_norm", "post_attention_layernorm"),
)
SANDWICH_NORMS: tuple[Norm, ...] = (  # Gemma 2/3: a norm before and after each block
    ("attn", "attn_norm", "input_layernorm"),
    ("attn", "post_attention_norm", "post_attention_layernorm"),
    ("ffn", "ffn_norm", "pre_feedforward_layernorm"),
    ("ffn", "post_ffw_norm", "post_feedforward_layernorm"),
)


@dataclass(frozen=True)
class Architecture:
    """`name`: the GGUF architecture of a model whose layers keep one size; `rope_pairs`: transformers rotates halves
    and llama.cpp pairs (2i, 2i + 1), so q/k rows are permuted; `qkv_bias`: its graph adds q/k/v biases;
    `head_norms`: its `attn_q_norm`/`attn_k_norm` span one head (`"head"`) or every head (`"all"`);
    `whole_attention`: its loader sizes the query projection by the hidden width, so heads cannot be pruned;
    `per_layer`: the architecture that reads per-layer head and channel counts and output-projection biases (None:
    none does for this layout); `experts`: it reads MoE experts (`ffn_{gate,up,down}_exps`, the router as
    `ffn_gate_inp`), `expert_width_key`: their width has a key of its own, `routing_norm`: its graph renormalises the
    top-k routing weights (what the config's `norm_topk_prob` must say), `shared_expert`: Qwen2-MoE's sigmoid-gated
    shared expert (`ffn_*_shexp`); `norms`: the layer norms it reads, `norm_offset`: added to every norm weight
    (Gemma normalises by x·(1 + w), llama.cpp by x·w); `fused`: `attn_qkv` and an `ffn_up` of [gate; up] rows
    (Phi-3) or the latter alone (GLM-4); `output`: `"untied"` writes `output.weight` unless the embeddings are tied,
    `"tied"` never (the graph reads the embeddings; an untied model is refused), `"always"` always; `sliding`: its
    graph has the family's sliding-window attention; `keys`: writes the family's own metadata (and refuses what its
    graph would compute differently)."""

    name: str
    rope_pairs: bool = True
    qkv_bias: bool = False
    head_norms: str | None = None
    whole_attention: bool = False
    per_layer: str | None = None
    experts: bool = False
    expert_width_key: bool = False
    routing_norm: bool = True
    shared_expert: bool = False
    norms: tuple[Norm, ...] = PRE_NORMS
    norm_offset: float = 0.0
    fused: tuple[str, ...] = ()
    output: str = "untied"
    sliding: bool = False
    keys: Callable | None = None  # (writer, config, head_dim) -> None


def _granite_keys(writer, config, head_dim: int) -> None:
    """Granite's multipliers: embeddings × embedding_scale, each block's output × residual_scale, attention scores ×
    attention.scale, logits ÷ logit_scale (llama.cpp's keys for transformers' four)."""
    writer.add_embedding_scale(config.embedding_multiplier)
    writer.add_residual_scale(config.residual_multiplier)
    writer.add_attention_scale(config.attention_multiplier)
    writer.add_logit_scale(config.logits_scaling)


def _gemma_keys(writer, config, head_dim: int) -> None:
    """Gemma 2/3: llama.cpp scales queries by 1/√head_dim (transformers by query_pre_attn_scalar^-½), soft-caps as
    the config says, and slides its window on the layers transformers does (every other one; five of six)."""
    if config.query_pre_attn_scalar != head_dim:
        raise AdaPrunerError(
            f"GGUF export: llama.cpp scales {config.model_type}'s queries by 1/sqrt(head_dim) and this model by "
            f"query_pre_attn_scalar={config.query_pre_attn_scalar}^-1/2: it would compute another model"
        )
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)


def _smollm3_keys(writer, config, head_dim: int) -> None:
    """llama.cpp's smollm3 graph skips RoPE in every fourth layer, whatever the config says."""
    expected = [int((index + 1) % 4 != 0) for index in range(config.num_hidden_layers)]
    if list(config.no_rope_layers) != expected:
        raise AdaPrunerError(
            "GGUF export: llama.cpp's smollm3 graph skips RoPE in every fourth layer and this model's no_rope_layers "
            "differ: it would compute another model"
        )


LLAMA = Architecture("llama", per_layer="deci")
GEMMA3 = Architecture(
    "gemma3", rope_pairs=False, head_norms="head", norms=SANDWICH_NORMS, norm_offset=1.0, sliding=True, keys=_gemma_keys
)
ARCHITECTURES = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": Architecture("qwen2", rope_pairs=False, qkv_bias=True, whole_attention=True),
    "qwen3": Architecture("qwen3", rope_pairs=False, head_norms="head"),
    "granite": Architecture("granite", keys=_granite_keys),
    "smollm3": Architecture("smollm3", keys=_smollm3_keys),
    "phi3": Architecture("phi3", rope_pairs=False, whole_attention=True, fused=("qkv", "gate_up")),
    "olmo2": Architecture(
        "olmo2",
        rope_pairs=False,
        head_norms="all",
        whole_attention=True,
        norms=(
            ("attn", "post_attention_norm", "post_attention_layernorm"),
            ("ffn", "post_ffw_norm", "post_feedforward_layernorm"),
        ),
        output="always",
    ),
    "glm4": Architecture(
        "glm4",
        rope_pairs=False,
        qkv_bias=True,
        fused=("gate_up",),
        norms=(
            ("attn", "attn_norm", "input_layernorm"),
            ("attn", "post_attention_norm", "post_self_attn_layernorm"),
            ("ffn", "ffn_norm", "post_attention_layernorm"),
            ("ffn", "post_ffw_norm", "post_mlp_layernorm"),
        ),
    ),
    "gemma2": Architecture(
        "gemma2", rope_pairs=False, norms=SANDWICH_NORMS, norm_offset=1.0, output="tied", sliding=True, keys=_gemma_keys
    ),
    "gemma3_text": GEMMA3,
    "gemma3": GEMMA3,  # the multimodal checkpoint: its language model alone goes out
    "mixtral": Architecture("llama", experts=True),
    "qwen3_moe": Architecture("qwen3moe", rope_pairs=False, head_norms="head", experts=True, expert_width_key=True),
    "qwen2_moe": Architecture(
        "qwen2moe",
        rope_pairs=False,
        qkv_bias=True,
        whole_attention=True,
        experts=True,
        expert_width_key=True,
        routing_norm=False,
        shared_expert=True,
    ),
}


def architecture_of(family: Family) -> Architecture:
    """The llama.cpp architecture of `family`, or a one-line error naming the families exported."""
    if family.model_type not in ARCHITECTURES:
        raise AdaPrunerError(
            f"GGUF export writes {', '.join(ARCHITECTURES)} decoders; {family.model_type} needs a llama.cpp "
            "architecture adapruner does not write yet"
        )
    return ARCHITECTURES[family.model_type]
