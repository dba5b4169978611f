"""Helpers shared by the test modules: tiny saved models and pools, CLI runs, the masked-dense reference."""

import copy
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from adapruner.cli import main
from adapruner.model.structure import layer_info
from tests.models import tiny_llama, word_level_tokenizer


def save_tiny_model(path, seed=0):
    tiny_llama(seed=seed).save_pretrained(path)
    word_level_tokenizer().save_pretrained(path)


def write_pool(path, seed):
    words = torch.randint(1, 97, (900,), generator=torch.Generator().manual_seed(seed))
    path.write_text(" ".join(f"t{int(w)}" for w in words) + "\n")


def search_args(tmp_path, out, *extra):
    """A tiny CLI search of the paper's space (no refit pool: its cache folder holds the activation cache alone)."""
    return [
        "search",
        "--model",
        str(tmp_path / "model"),
        "--recipe",
        "paper",
        "--pools",
        str(tmp_path / "a.txt"),
        "--pool-size",
        "4",
        "--seq-len",
        "16",
        "--layers",
        "all",
        "--metrics",
        "l2,vector,taylor1",
        "--sample-counts",
        "1,2",
        "--blocks-per-pool",
        "2",
        "--val-windows",
        "2",
        "--trials",
        "2",
        "--batch-size",
        "2",
        "--cache-dtype",
        "float32",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        *extra,
    ]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, message: str) -> bool:
    return err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err


def masked_logits(model, plan, tokens):
    """Logits of the dense model with every removed head's o_proj columns and MLP channel's down_proj column (of a MoE
    layer, every removed expert channel's down column) zeroed."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for index, (keep_q, _keep_kv) in plan.attention.items():
            info = layer_info(masked, index)
            for q in set(range(info.n_heads)) - set(keep_q):
                info.attn.o_proj.weight[:, q * info.head_dim : (q + 1) * info.head_dim] = 0
        for index, keep in plan.mlp.items():
            info = layer_info(masked, index)
            for unit in set(range(info.mlp_units)) - set(keep):
                if info.experts is None:
                    info.mlp.down_proj.weight[:, unit] = 0
                else:  # unit e·I + c: expert e's channel c
                    info.experts.down_proj[unit // info.intermediate, :, unit % info.intermediate] = 0
        return masked(input_ids=tokens).logits


def tiny_search(tmp_path, model, **options):
    """Run a 3-trial search on `model` saved with the byte-level tokenizer and a random pool; returns the best
    trial. `options` override the SearchOptions (spec: ratio 0.5 over all layers; metrics l2, taylor1, vector)."""
    from pathlib import Path

    from adapruner.choosing.spec import PruneSpec
    from adapruner.commands.search import run_search
    from adapruner.searching.search_options import SearchOptions

    model.save_pretrained(tmp_path / "model")
    byte_level_tokenizer().save_pretrained(tmp_path / "model")
    write_pool(tmp_path / "a.txt", seed=1)
    settings = {
        "model": str(tmp_path / "model"),
        "spec": PruneSpec(0.5, layers="all"),
        "pools": [str(tmp_path / "a.txt")],
        "pool_size": 4,
        "seq_len": 16,
        "metrics": ("l2", "taylor1", "vector"),
        "sample_counts": (1, 2),
        "blocks_per_pool": 2,
        "val_windows": 2,
        "trials": 3,
        "cache_dir": str(tmp_path / "cache"),
        "cache_dtype": "float32",
        **options,
    }
    return run_search(SearchOptions(**settings), Path(tmp_path / "s"), progress=False)


FAMILY_KWARGS = {  # per model_type, beside TINY_BASE: what its config needs to build a tiny model
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {"query_pre_attn_scalar": 8, "sliding_window": 4},
    "gemma3_text": {"query_pre_attn_scalar": 8, "sliding_window": 4},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "granite": {
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.25,
        "logits_scaling": 2.0,
    },
    "smollm3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "glm4": {"pad_token_id": 0, "eos_token_id": 2},
    "olmo2": {"pad_token_id": 0, "eos_token_id": 2},
}
TINY_BASE = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 24,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
}
FAMILY_TYPES = (*FAMILY_KWARGS, "gemma3")
MOE_KWARGS = {  # 4 experts of 24 channels, 2 per token
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 16,
    },
}
MOE_TYPES = tuple(MOE_KWARGS)
DERIVED_KWARGS = {  # families without an entry in FAMILIES (their layout derived from their modules), issue 35
    "ministral": {},
    "ministral3": {},
    "ernie4_5": {"use_bias": True},
    "helium": {"attention_bias": True},
    "gemma": {},
    "seed_oss": {},
    "glm": {"pad_token_id": 0},
    "stablelm": {"use_qkv_bias": True},
    "cohere2": {},
    "exaone4": {},
    "hunyuan_v1_dense": {"attention_bias": True},
    "arcee": {"mlp_bias": True},
    "nemotron": {},
    "olmo3": {},
}
DERIVED_MOE_KWARGS = {
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def tiny_family(model_type: str, seed: int = 0, **config_overrides):
    """A random 4-layer GQA model of `model_type` (4 query / 2 kv heads of 8, hidden 32, 24 MLP channels), with
    random biases and norm weights so that a wrong slice of either shows in the logits; `gemma3` is the multimodal
    checkpoint whose language model holds the layers; `config_overrides` replace config values (not for `gemma3`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if model_type == "gemma3":
        text = {"model_type": "gemma3_text", **TINY_BASE, **FAMILY_KWARGS["gemma3_text"]}
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
        }
        config = AutoConfig.for_model(
            "gemma3",
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=96,
            boi_token_index=94,
            eoi_token_index=95,
        )
    else:
        every = {**FAMILY_KWARGS, **MOE_KWARGS, **DERIVED_KWARGS, **DERIVED_MOE_KWARGS}
        config = AutoConfig.for_model(model_type, **TINY_BASE, **every[model_type] | config_overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                param.normal_(0, 0.1)  # from_config leaves 3-D expert weights uninitialised
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
            elif name.endswith("norm") and getattr(module, "weight", None) is not None:
                module.weight.normal_(1, 0.1)
    return model


def byte_level_tokenizer():
    """A 97-token byte-level BPE tokenizer (a token per character of "t0 … t96" text, and "Ġt" from one merge):
    transformers 5 reads some families' tokenizers with their own byte-level class (Qwen2's), which a word-level
    vocabulary does not survive, and llama.cpp wants at least one merge."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["t", *"0123456789", "Ġ", "Ġt"]
    vocab = {**{c: i for i, c in enumerate(chars)}, **{f"<x{i}>": i for i in range(len(chars), 97)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<x96>")


T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `condition` every `interval` seconds until it returns a truthy value, and return that value; raise
    AssertionError naming `what` (what the caller waited for) if none came within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
