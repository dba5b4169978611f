"""Remote code for models pruned by adapruner: a stock LLaMA/Mistral/Qwen2 model whose layers differ in size.

The config adds `num_attention_heads_per_layer`, `num_key_value_heads_per_layer` and
`intermediate_size_per_layer`; the model builds the stock architecture, then gives each layer's projections
those sizes. `output_bias: true` gives every o_proj and down_proj a bias (compensation after pruning writes them). Load with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
This file imports only torch and transformers so that it works without adapruner installed.
"""

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


def _resize_layers(model, config) -> None:
    """Replace every layer's projections with linears of that layer's head and channel counts."""
    head_dim, hidden = config.head_dim, config.hidden_size
    sizes = zip(
        config.num_attention_heads_per_layer, config.num_key_value_heads_per_layer, config.intermediate_size_per_layer
    )
    for layer, (n_heads, n_kv, inter) in zip(model.model.layers, sizes):
        attn, mlp = layer.self_attn, layer.mlp
        output_bias = getattr(config, "output_bias", False)
        qkv_bias, o_bias = attn.q_proj.bias is not None, attn.o_proj.bias is not None or output_bias
        attn.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        attn.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
        attn.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
        attn.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        attn.num_key_value_groups = n_heads // n_kv
        mlp_bias = mlp.gate_proj.bias is not None
        mlp.gate_proj = nn.Linear(hidden, inter, bias=mlp_bias)
        mlp.up_proj = nn.Linear(hidden, inter, bias=mlp_bias)
        mlp.down_proj = nn.Linear(inter, hidden, bias=mlp.down_proj.bias is not None or output_bias)
        mlp.intermediate_size = inter


def _pruned_config(base, model_type: str, base_type: str):
    def __init__(
        self,
        num_attention_heads_per_layer=None,
        num_key_value_heads_per_layer=None,
        intermediate_size_per_layer=None,
        output_bias=False,
        **kwargs,
    ):
        kwargs.pop("base_model_type", None)
        base.__init__(self, **kwargs)
        layers = self.num_hidden_layers
        self.num_attention_heads_per_layer = list(num_attention_heads_per_layer or [self.num_attention_heads] * layers)
        self.num_key_value_heads_per_layer = list(num_key_value_heads_per_layer or [self.num_key_value_heads] * layers)
        self.intermediate_size_per_layer = list(intermediate_size_per_layer or [self.intermediate_size] * layers)
        self.base_model_type = base_type
        self.output_bias = output_bias
        if getattr(self, "head_dim", None) is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    return type(f"Pruned{base.__name__}", (base,), {"model_type": model_type, "__init__": __init__})


def _pruned_model(base, config_class):
    def __init__(self, config):
        base.__init__(self, config)
        _resize_layers(self, config)
        self.post_init()

    return type(f"Pruned{base.__name__}", (base,), {"config_class": config_class, "__init__": __init__})


PrunedLlamaConfig = _pruned_config(LlamaConfig, "pruned_llama", "llama")
PrunedMistralConfig = _pruned_config(MistralConfig, "pruned_mistral", "mistral")
PrunedQwen2Config = _pruned_config(Qwen2Config, "pruned_qwen2", "qwen2")
PrunedLlamaForCausalLM = _pruned_model(LlamaForCausalLM, PrunedLlamaConfig)
PrunedMistralForCausalLM = _pruned_model(MistralForCausalLM, PrunedMistralConfig)
PrunedQwen2ForCausalLM = _pruned_model(Qwen2ForCausalLM, PrunedQwen2Config)
