"""Remote code for models pruned by adapruner: a stock transformers decoder whose layers differ in size.

The config adds `num_attention_heads_per_layer`, `num_key_value_heads_per_layer` and `intermediate_size_per_layer`
(and `head_dim`); the model builds the stock architecture of its family (`base_model_type`), then gives each layer's
projections those sizes. A family outside the table below (read from the model's structure by adapruner) carries its
layout in the config (`adapruner_layout`: the layer path and the attention's and MLP's module names, fusions,
norms). `output_bias: true` gives every attention and MLP output projection a bias (compensation after pruning
writes them). Load with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. This file imports only
torch and transformers so that it works without adapruner installed; adapruner reads its `fit_layer` too, so an
in-memory pruned model and a reloaded one run the same way.
"""

import copy
import warnings

import torch
import transformers
from torch import nn

# model_type → (config class, model class, path to the decoder layers, fused qkv, fused gate_up,
#               norms spanning all heads, attention reads its head count from the config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "model.layers", None, None, None, False),
    "mistral": ("MistralConfig", "MistralForCausalLM", "model.layers", None, None, None, False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "model.layers", None, None, None, False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "model.layers", None, None, None, False),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "model.layers", None, None, None, False),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "model.layers", None, None, None, False),
    "gemma3": (
        "Gemma3Config",
        "Gemma3ForConditionalGeneration",
        "model.language_model.layers",
        None,
        None,
        None,
        False,
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "model.layers", "qkv_proj", "gate_up_proj", None, True),
    "granite": ("GraniteConfig", "GraniteForCausalLM", "model.layers", None, None, None, False),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", "model.layers", None, None, None, False),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", "model.layers", None, "gate_up_proj", None, False),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", "model.layers", None, None, ("q_norm", "k_norm"), False),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "model.layers", None, None, None, False),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "model.layers", None, None, None, False),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "model.layers", None, None, None, False),
}


class LayerConfig:
    """The shared config as one pruned layer's attention sees it: its own head counts, everything else (read or
    written, e.g. the attention implementation) passed through to the shared config."""

    def __init__(self, shared, **own):
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_own", own)

    def __getattr__(self, name):
        own = object.__getattribute__(self, "_own")
        return own[name] if name in own else getattr(object.__getattribute__(self, "_shared"), name)

    def __setattr__(self, name, value):
        if name in self._own:
            self._own[name] = value
        else:
            setattr(self._shared, name, value)

    def __deepcopy__(self, memo):
        return LayerConfig(copy.deepcopy(self._shared, memo), **self._own)

    def __copy__(self):
        return LayerConfig(self._shared, **self._own)


def fit_layer(attn, mlp, n_heads, n_kv, intermediate, layer_config=False):
    """Set the attributes a layer's forwards read to its sizes: the GQA ratio, the kv head count, the MLP width, and
    for families whose attention reads the head count from the config, a per-layer view of it."""
    attn.num_key_value_groups = n_heads // n_kv if n_kv else 0
    if n_heads == 0 and not isinstance(attn, RemovedAttention):
        attn.__class__ = _removed(type(attn))
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = n_kv
    if hasattr(attn, "num_heads"):  # attentions that reshape by their own head count (StableLM)
        attn.num_heads = n_heads
    mlp.intermediate_size = intermediate
    experts = getattr(mlp, "experts", None)
    if experts is not None:  # MoE: every expert keeps `intermediate` channels
        experts.intermediate_dim = intermediate
        shared = experts.config._shared if isinstance(experts.config, LayerConfig) else experts.config
        # grouped_mm needs 16-byte strides (8 channels in bf16): narrower widths run the per-expert loop
        experts.config = shared if intermediate % 8 == 0 else LayerConfig(shared, _experts_implementation="eager")
    if layer_config:
        shared = attn.config._shared if isinstance(attn.config, LayerConfig) else attn.config
        attn.config = LayerConfig(shared, num_attention_heads=n_heads, num_key_value_heads=n_kv)


class RemovedAttention:
    """An attention block left with no heads: it adds its output projection's bias to the residual stream (nothing
    without one), the constant an lsq refit of no kept heads leaves. Mixed into the family's attention class."""

    def forward(self, hidden_states, *args, **kwargs):
        return self.o_proj(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


def _removed(attention_class):
    """`attention_class` with `RemovedAttention`'s forward, made once per class."""
    if attention_class not in _REMOVED:
        name = f"Removed{attention_class.__name__}"
        _REMOVED[attention_class] = type(name, (RemovedAttention, attention_class), {})
    return _REMOVED[attention_class]


_REMOVED = {}


def _layers(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _linear(old, in_features, out_features, bias):
    with warnings.catch_warnings():  # a removed block's projections hold no weights: nothing to initialise
        warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
        return nn.Linear(in_features, out_features, bias=bias, dtype=old.weight.dtype, device=old.weight.device)


def _norm(old, size):
    norm = copy.copy(old)
    norm._parameters = dict(old._parameters)
    norm.weight = nn.Parameter(torch.ones(size, dtype=old.weight.dtype, device=old.weight.device))
    return norm


def _layout(config, family):
    """The family's layout: its row of the table, or the `adapruner_layout` a derived family's config carries."""
    if family in FAMILIES:
        _, _, path, qkv, gate_up, head_norms, layer_config = FAMILIES[family]
        return {
            "layers": path,
            "attention": "self_attn",
            "mlp": "mlp",
            "gate": "gate_proj",
            "qkv": qkv,
            "gate_up": gate_up,
            "head_norms": head_norms,
            "layer_config": layer_config,
        }
    return dict(config.adapruner_layout)


def _resize_layers(model, config, family):
    """Replace every layer's projections (and norms spanning its heads) with ones of that layer's sizes."""
    layout = _layout(config, family)
    qkv, gate_up, head_norms = layout["qkv"], layout["gate_up"], layout["head_norms"]
    text = config.get_text_config()
    head_dim, hidden = text.head_dim, text.hidden_size
    output_bias = getattr(config, "output_bias", False)
    sizes = zip(
        config.num_attention_heads_per_layer, config.num_key_value_heads_per_layer, config.intermediate_size_per_layer
    )
    for layer, (n_heads, n_kv, inter) in zip(_layers(model, layout["layers"]), sizes):
        attn, mlp = getattr(layer, layout["attention"]), getattr(layer, layout["mlp"])
        q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim
        if qkv:
            old = getattr(attn, qkv)
            setattr(attn, qkv, _linear(old, hidden, q_rows + 2 * kv_rows, old.bias is not None))
        else:
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                old = getattr(attn, name)
                setattr(attn, name, _linear(old, hidden, rows, old.bias is not None))
        attn.o_proj = _linear(attn.o_proj, q_rows, hidden, attn.o_proj.bias is not None or output_bias)
        for name, rows in zip(head_norms or (), (q_rows, kv_rows)):
            setattr(attn, name, _norm(getattr(attn, name), rows))
        experts = getattr(mlp, "experts", None)
        if experts is not None:  # MoE: 3-D expert weights, the router and any shared expert stay
            n_experts, like = experts.gate_up_proj.shape[0], experts.gate_up_proj
            shape = {"gate_up_proj": (n_experts, 2 * inter, hidden), "down_proj": (n_experts, hidden, inter)}
            for name, size in shape.items():
                setattr(experts, name, nn.Parameter(torch.empty(size, dtype=like.dtype, device=like.device)))
        elif gate_up:
            old = getattr(mlp, gate_up)
            setattr(mlp, gate_up, _linear(old, hidden, 2 * inter, old.bias is not None))
        else:  # gate and up, or up alone (an MLP without a gate)
            for name in ("gate_proj", "up_proj") if layout["gate"] else ("up_proj",):
                old = getattr(mlp, name)
                setattr(mlp, name, _linear(old, hidden, inter, old.bias is not None))
        if experts is None:
            mlp.down_proj = _linear(mlp.down_proj, inter, hidden, mlp.down_proj.bias is not None or output_bias)
        fit_layer(attn, mlp, n_heads, n_kv, inter, layout["layer_config"])


def _pruned_config(base, model_type, base_type):
    def __init__(
        self,
        num_attention_heads_per_layer=None,
        num_key_value_heads_per_layer=None,
        intermediate_size_per_layer=None,
        output_bias=False,
        **kwargs,
    ):
        kwargs.pop("base_model_type", None)
        layout = kwargs.pop("adapruner_layout", None)
        base.__init__(self, **kwargs)
        text = self.get_text_config()
        layers = text.num_hidden_layers
        self.num_attention_heads_per_layer = list(num_attention_heads_per_layer or [text.num_attention_heads] * layers)
        self.num_key_value_heads_per_layer = list(num_key_value_heads_per_layer or [text.num_key_value_heads] * layers)
        width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        self.intermediate_size_per_layer = list(intermediate_size_per_layer or [width] * layers)
        self.base_model_type = base_type
        self.output_bias = output_bias
        if layout is not None:
            self.adapruner_layout = layout
        if getattr(text, "head_dim", None) is None:
            text.head_dim = text.hidden_size // text.num_attention_heads

    return type(f"Pruned{base.__name__}", (base,), {"model_type": model_type, "__init__": __init__})


def _pruned_model(base, config_class, family):
    def __init__(self, config):
        base.__init__(self, config)
        _resize_layers(self, config, family)
        self.post_init()

    return type(f"Pruned{base.__name__}", (base,), {"config_class": config_class, "__init__": __init__})


def _pruned_classes(family):
    """(config class, model class) of a pruned model of a family of the table."""
    config_name, model_name = FAMILIES[family][:2]
    return _pruned_config_class(family, config_name), _pruned_model_class(family, model_name)


def _pruned_config_class(family, config_name):
    """The pruned config class of `family` over transformers' `config_name`, made once."""
    if family not in _CONFIGS:
        _share_checkpoint_conversion(family)
        _CONFIGS[family] = _pruned_config(getattr(transformers, config_name), f"pruned_{family}", family)
    return _CONFIGS[family]


def _pruned_model_class(family, model_name):
    """The pruned model class of `family` over transformers' `model_name`, made once."""
    if (family, model_name) not in _MODELS:
        base = getattr(transformers, model_name)
        config_class = _pruned_config_class(family, base.config_class.__name__)
        _MODELS[family, model_name] = _pruned_model(base, config_class, family)
    return _MODELS[family, model_name]


def _share_checkpoint_conversion(family):
    """Let a pruned model read its checkpoint as the family's stock class does (MoE experts are saved one tensor per
    expert and fused into 3-D weights on load); custom classes get no conversion unless registered."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without checkpoint conversions saves what it loads
        return
    mapping = get_checkpoint_conversion_mapping(family)
    if mapping:
        register_checkpoint_conversion_mapping(f"pruned_{family}", mapping, overwrite=True)


_CONFIGS, _MODELS = {}, {}
_BY_NAME = {f"Pruned{names[k]}": (family, k) for family, names in FAMILIES.items() for k in (0, 1)}


def __getattr__(name):
    """`PrunedLlamaConfig`, `PrunedLlamaForCausalLM`, … made on first use (transformers' `auto_map` asks by name); a
    derived family's from the transformers class it names (`PrunedHeliumConfig` → `HeliumConfig`)."""
    if name in _BY_NAME:
        family, k = _BY_NAME[name]
        return _pruned_classes(family)[k]
    try:  # transformers' lazy module may fail to import a class whose backend is missing
        base = getattr(transformers, name[len("Pruned") :], None) if name.startswith("Pruned") else None
    except Exception:
        base = None
    if isinstance(base, type) and issubclass(base, transformers.PretrainedConfig):
        return _pruned_config_class(base.model_type, base.__name__)
    if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
        return _pruned_model_class(base.config_class.model_type, base.__name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
