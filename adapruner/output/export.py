"""Export a (pruned) model to GGUF for llama.cpp, written with the `gguf` package.

Layers of one size go out as the family's llama.cpp architecture (`gguf_arch`: llama, qwen2, qwen3); per-layer
widths (or compensation biases) of the llama layout as `deci`, whose loader reads `head_count`, `head_count_kv` and
`feed_forward_length` as per-layer arrays and takes optional `attn_output.bias` / `ffn_down.bias`. A removed block
(issue 33: no heads, or no channels) goes out as `deci`'s `head_count = 0` / `feed_forward_length = 0` with no
tensors, which its graph skips; where that graph would compute something else — the refit left the block a bias (its
mean output), which it would not add, or an MLP is removed below a kept attention, whose output it would then drop —
the block goes out as one head (one channel) whose values (up row) are zero, so it adds exactly its bias, or nothing.
Where the architecture rotates interleaved pairs (llama, deci), q and k rows are permuted from transformers'
rotate-half RoPE layout: per head, rows (i, i + d/2) become rows (2i, 2i + 1); qwen2/qwen3 rotate halves as
transformers does. The tokenizer (byte-level BPE vocabulary, merges, special tokens, chat template) goes into the
metadata.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adapruner.errors import AdaPrunerError
from adapruner.model.families import family_of, text_config
from adapruner.model.structure import EXPERT_WEIGHTS, decoder_layers, layer_info, layers_owner
from adapruner.output.gguf_arch import Architecture, architecture_of
from adapruner.output.imatrix import imatrix_of
from adapruner.output.quantize import QUANT_TYPES, Fallback, check_quantizer, quantize
from adapruner.staging import staged_file

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def export_gguf(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    outtype: str = "f32",
    imatrix_windows: torch.Tensor | None = None,
) -> list[Fallback]:
    """Write `model` to the new file `out` (staged: nothing is left behind on an error) as `outtype`: f32/f16/bf16/q8_0
    written here, llama.cpp's quantized types (`QUANT_TYPES`) by its own quantizer from an f32 file, weighted by the
    importance matrix of `imatrix_windows` where given. Returns the tensors that fell back from the K-quant asked for
    (`quantize.fallbacks`)."""
    if outtype not in (*OUTTYPES, *QUANT_TYPES):
        raise AdaPrunerError(f"unknown --outtype {outtype!r}: use one of {', '.join((*OUTTYPES, *QUANT_TYPES))}")
    if imatrix_windows is not None and outtype not in QUANT_TYPES:
        raise AdaPrunerError(f"--imatrix weighs llama.cpp's quantizer: pass a quantized --outtype, not {outtype}")
    check_quantizer(outtype)
    config, infos, arch = _checked_layout(model)
    sizes = [_exported_size(info, info is infos[-1]) for info in infos]
    deci = len(set(sizes)) > 1 or 0 in {n for size in sizes for n in size} or _has_output_biases(infos)
    if deci and (arch.per_layer is None or infos[0].experts is not None):
        raise AdaPrunerError(
            f"GGUF export: llama.cpp's {arch.name} takes layers of one size without output-projection biases; this "
            "model has per-layer widths or refit biases: prune it with --stock-config (one size for every layer) "
            "and --compensate none"
        )
    layout = (config, infos, arch, sizes, deci)
    with staged_file(Path(out)) as staging:
        if outtype not in QUANT_TYPES:
            _write(model, tokenizer, staging, outtype, layout)
            return []
        with tempfile.TemporaryDirectory(prefix=".f32-", dir=staging.parent) as folder:
            source = Path(folder) / "model.gguf"
            _write(model, tokenizer, source, "f32", layout)
            matrix = None if imatrix_windows is None else imatrix_of(model, imatrix_windows, arch.fused)
            return quantize(source, staging, outtype, matrix)


def _write(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, outtype: str, layout: tuple) -> None:
    """The GGUF file of `model` at `path`, its 2-D weights in `outtype` (f32/f16/bf16/q8_0)."""
    import gguf

    config, infos, arch, sizes, deci = layout
    writer = gguf.GGUFWriter(str(path), arch.per_layer if deci else arch.name)
    _write_hparams(writer, layout, outtype)
    _write_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
    tensors = [*_tensors(model, infos, sizes, config, arch), *_rope_factors(config, infos[0].head_dim)]
    for name, tensor in tensors:
        data, qtype = _encoded(tensor, outtype)
        quantized = qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        writer.add_tensor(name, data, raw_dtype=qtype if quantized else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _checked_layout(model: nn.Module) -> tuple:
    """(the config with the decoder's sizes, every layer's `LayerInfo`, the llama.cpp architecture); what llama.cpp
    cannot hold is a one-line error."""
    arch = architecture_of(family_of(model.config))
    config = text_config(model.config)
    rope, _sliding_rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise AdaPrunerError(
            f"GGUF export: RoPE scaling {rope.get('rope_type')!r} is not written yet (default, llama3)"
        )
    if _sliding(config) and not arch.sliding:
        raise AdaPrunerError(f"GGUF export: llama.cpp's {arch.name} graph has no sliding-window attention")
    if arch.output == "tied" and not getattr(config, "tie_word_embeddings", False):
        raise AdaPrunerError(f"GGUF export: llama.cpp's {arch.name} reads its output from the (untied) embeddings")
    infos = [layer_info(model, i) for i in range(len(decoder_layers(model)))]
    for info in infos:
        attn, mlp, f = info.attn, info.mlp, info.family
        biased = [getattr(attn, n).bias is not None for n in f.attention_inputs]
        if any(biased) and not (arch.qkv_bias and all(biased)):
            raise AdaPrunerError(f"GGUF export: llama.cpp's {arch.name} graph reads no q/k/v biases")
        if info.experts is None and any(getattr(mlp, n).bias is not None for n in f.mlp_inputs):
            raise AdaPrunerError(f"GGUF export: llama.cpp's {arch.name} graph reads no gate/up biases")
        if info.experts is not None and getattr(config, "norm_topk_prob", True) != arch.routing_norm:
            raise AdaPrunerError(
                f"GGUF export: llama.cpp's {arch.name} graph {'renormalises' if arch.routing_norm else 'keeps'} the "
                f"top-k routing weights and this model's config says norm_topk_prob={config.norm_topk_prob}: it would "
                "compute another model"
            )
        if arch.whole_attention and info.n_heads * info.head_dim != config.hidden_size:
            raise AdaPrunerError(
                f"GGUF export: llama.cpp's {arch.name} sizes its attention by the hidden width, and layer {info.index} "
                f"kept {info.n_heads} of {config.num_attention_heads} heads: prune it with --no-attention"
            )
        if info.n_heads and info.n_heads % info.n_kv_heads:
            raise AdaPrunerError(
                f"GGUF export: layer {info.index} has {info.n_heads} heads for {info.n_kv_heads} kv heads"
            )
    return config, infos, arch


def _sliding(config) -> bool:
    """Whether any layer attends through a sliding window (the config's `layer_types`, else its `sliding_window`)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return any("sliding" in str(kind) for kind in kinds)
    return bool(getattr(config, "sliding_window", None))


def _has_output_biases(infos) -> bool:
    downs = [_dense_down(i) for i in infos]
    return any(getattr(i.attn, i.family.o).bias is not None for i in infos) or any(
        d is not None and d.bias is not None for d in downs
    )


def _dense_down(info) -> nn.Linear | None:
    """The MLP's down projection, None for MoE experts (they carry no biases)."""
    return None if info.experts is not None else getattr(info.mlp, info.family.down)


def _carries_bias(linear: nn.Linear) -> bool:
    return linear.bias is not None and bool(linear.bias.detach().any())


def _exported_size(info, last: bool) -> tuple[int, int, int]:
    """(heads, kv heads, MLP channels) a layer goes out with: as it is, but a removed block goes out with one
    zero-valued unit where it carries a bias, and a removed MLP also below a kept attention or in the `last` layer:
    llama.cpp's deci graph ends a layer at `feed_forward_length` 0 before adding the attention's output, and fails
    an assertion when the last layer ends so (both measured, llama-cpp-python 0.3.36)."""
    f = info.family
    heads, kv_heads = (info.n_heads, info.n_kv_heads)
    if heads == 0 and _carries_bias(getattr(info.attn, f.o)):
        heads, kv_heads = 1, 1
    channels = info.intermediate
    if channels == 0 and (heads or last or (_dense_down(info) is not None and _carries_bias(_dense_down(info)))):
        channels = 1
    return heads, kv_heads, channels


def _write_hparams(writer, layout: tuple, outtype: str) -> None:
    import gguf

    config, infos, arch, sizes, deci = layout
    head_dim = infos[0].head_dim
    heads, kv_heads, ffn = (list(values) if deci else values[0] for values in zip(*sizes))
    writer.add_name(getattr(config, "_name_or_path", "") or "adapruner-pruned")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(infos))
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope, sliding_rope = _rope_parameters(config)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if sliding_rope:
        writer.add_rope_freq_base_swa(sliding_rope.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch.keys is not None:
        arch.keys(writer, config, head_dim)
    if infos[0].experts is not None:
        writer.add_expert_count(infos[0].n_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if arch.expert_width_key:
            writer.add_expert_feed_forward_length(infos[0].intermediate)
        if arch.shared_expert:
            shared = infos[0].mlp.shared_expert
            writer.add_expert_shared_feed_forward_length(getattr(shared, infos[0].family.down).in_features)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[outtype])


def _write_tokenizer(writer, tokenizer: PreTrainedTokenizerBase, rows: int) -> None:
    """Byte-level BPE vocabulary (ids in order, padded to the embedding's `rows` with unused entries), token types,
    merges, special ids and chat template."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        backend = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        model = backend.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or "Metaspace" in json.dumps(backend):
            raise AdaPrunerError(
                "GGUF export writes byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM style); this model's is "
                "SentencePiece-style or another kind, which adapruner does not write yet"
            )
        if not model.get("merges"):
            raise AdaPrunerError("GGUF export: the BPE tokenizer has no merges, which llama.cpp needs to load it")
        vocab = tokenizer.get_vocab()
        by_id = {index: token for token, index in vocab.items()}
        if max(by_id) >= rows:
            raise AdaPrunerError(f"GGUF export: the tokenizer has ids up to {max(by_id)} for {rows} embedding rows")
        special = {t["content"] for t in backend.get("added_tokens", []) if t.get("special")}
        added = {t["content"] for t in backend.get("added_tokens", [])}
        tokens, types = [], []
        for index in range(rows):
            token = by_id.get(index, f"[PAD{index}]")
            tokens.append(token)
            kind = (
                gguf.TokenType.CONTROL
                if token in special
                else gguf.TokenType.USER_DEFINED
                if token in added
                else gguf.TokenType.NORMAL
            )
            types.append(kind if index in by_id else gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(backend.get("pre_tokenizer") or {}))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"  # Llama-3's split regex opens so
)


def _pre_tokenizer(pre: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: GPT-2's byte-level regex (`gpt-2`) or Llama-3's split
    regex before a byte-level step (`llama-bpe`); another one is a one-line error (llama.cpp would split text
    differently from transformers)."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    patterns = [s.get("pattern", {}).get("Regex", "") for s in steps if s.get("type") == "Split"]
    if patterns and patterns[0].startswith(LLAMA3_SPLIT) and steps[-1].get("type") == "ByteLevel":
        return "llama-bpe"
    raise AdaPrunerError(
        "GGUF export knows GPT-2's and Llama-3's byte-level pre-tokenizers; this tokenizer splits text another way"
    )


def _tensors(model: nn.Module, infos, sizes: list[tuple[int, int, int]], config, arch: Architecture):
    """(GGUF name, tensor) of every weight, q/k rows permuted where llama.cpp's RoPE rotates pairs; a removed block as
    `sizes` says (module docstring)."""
    base = model.get_input_embeddings()
    yield "token_embd.weight", base.weight
    yield "output_norm.weight", _final_norm(model).weight + arch.norm_offset
    tied = getattr(config, "tie_word_embeddings", False)
    if arch.output == "always" or (arch.output == "untied" and not tied):
        yield "output.weight", model.get_output_embeddings().weight
    for info, (heads, _kv_heads, channels) in zip(infos, sizes):
        layer, b = decoder_layers(model)[info.index], f"blk.{info.index}"
        norms: dict[str, list] = {}  # block → its (GGUF name, weight) norms
        for block, name, attr in arch.norms:
            norms.setdefault(block, []).append((f"{b}.{name}.weight", getattr(layer, attr).weight + arch.norm_offset))
        if heads:
            yield from norms.get("attn", [])
            yield from _attention_tensors(info, b, arch)
        if channels:
            yield from norms.get("ffn", [])
            yield from _mlp_tensors(info, b, arch) if info.experts is None else _expert_tensors(info, b)


def _attention_tensors(info, b: str, arch: Architecture):
    f, attn = info.family, info.attn
    o = getattr(attn, f.o)
    if not info.n_heads:  # a removed attention with a bias (deci): one head whose values are 0
        head = o.weight.new_zeros(info.head_dim, o.out_features)
        yield from ((f"{b}.attn_{name}.weight", head) for name in ("q", "k", "v"))
        yield f"{b}.attn_output.weight", head.T
    elif "qkv" in arch.fused:
        yield f"{b}.attn_qkv.weight", getattr(attn, f.qkv).weight
    else:
        rope_rows = _rope_rows if arch.rope_pairs else lambda weight, _heads: weight
        q, k, v = (getattr(attn, name) for name in (f.q, f.k, f.v))
        yield f"{b}.attn_q.weight", rope_rows(q.weight, info.n_heads)
        yield f"{b}.attn_k.weight", rope_rows(k.weight, info.n_kv_heads)
        yield f"{b}.attn_v.weight", v.weight
        if arch.qkv_bias and q.bias is not None:
            yield from ((f"{b}.attn_{n}.bias", linear.bias) for n, linear in zip("qkv", (q, k, v)))
    if info.n_heads:
        yield f"{b}.attn_output.weight", o.weight
        if arch.head_norms:
            yield f"{b}.attn_q_norm.weight", attn.q_norm.weight + arch.norm_offset
            yield f"{b}.attn_k_norm.weight", attn.k_norm.weight + arch.norm_offset
    if o.bias is not None:
        yield f"{b}.attn_output.bias", o.bias


def _mlp_tensors(info, b: str, arch: Architecture):
    f = info.family
    down = getattr(info.mlp, f.down)
    if not info.intermediate:  # a removed MLP with a bias (deci): one channel whose up row is 0
        channel = down.weight.new_zeros(1, down.out_features)
        yield from ((f"{b}.ffn_{name}.weight", channel) for name in ("gate", "up"))
        yield f"{b}.ffn_down.weight", channel.T
    elif "gate_up" in arch.fused:  # [gate; up] rows in one ffn_up, as transformers' gate_up_proj
        yield f"{b}.ffn_up.weight", getattr(info.mlp, f.gate_up).weight
        yield f"{b}.ffn_down.weight", down.weight
    else:
        yield f"{b}.ffn_gate.weight", getattr(info.mlp, f.gate).weight
        yield f"{b}.ffn_up.weight", getattr(info.mlp, f.up).weight
        yield f"{b}.ffn_down.weight", down.weight
    if down.bias is not None:
        yield f"{b}.ffn_down.bias", down.bias


def _expert_tensors(info, b: str):
    """The router (`ffn_gate_inp`), every expert's gate, up [E, I, H] and down [E, H, I] rows (the fused gate_up
    split: gate rows first), and Qwen2-MoE's shared expert with its sigmoid gate."""
    mlp, f = info.mlp, info.family
    gate_up, down = (getattr(info.experts, name) for name in EXPERT_WEIGHTS)
    yield f"{b}.ffn_gate_inp.weight", mlp.gate.weight
    yield f"{b}.ffn_gate_exps.weight", gate_up[:, : info.intermediate]
    yield f"{b}.ffn_up_exps.weight", gate_up[:, info.intermediate :]
    yield f"{b}.ffn_down_exps.weight", down
    shared = getattr(mlp, "shared_expert", None)
    if shared is not None:
        yield f"{b}.ffn_gate_inp_shexp.weight", mlp.shared_expert_gate.weight
        for name, role in (("gate", f.gate), ("up", f.up), ("down", f.down)):
            yield f"{b}.ffn_{name}_shexp.weight", getattr(shared, role).weight


def _rope_factors(config, head_dim: int):
    """Llama-3's RoPE scaling as llama.cpp reads it: `rope_freqs.weight`, one divisor per frequency pair —
    1 for short wavelengths, `factor` for long ones, a smooth blend between (Llama 3.1's published rule)."""
    rope, _sliding_rope = _rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return []
    base, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    wavelength = 2 * math.pi * base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    smooth = (context / wavelength - low) / (high - low)
    divisors = torch.where(
        wavelength < context / high,
        1.0,
        torch.where(wavelength > context / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    return [("rope_freqs.weight", divisors.float())]


def _rope_parameters(config) -> tuple[dict, dict | None]:
    """(the RoPE parameters of full-attention layers, of sliding-window layers where they differ: Gemma-3's)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rope:
        return rope["full_attention"], rope.get("sliding_attention")
    return rope, None


def _final_norm(model: nn.Module) -> nn.Module:
    owner, _ = layers_owner(model)
    if not isinstance(getattr(owner, "norm", None), nn.Module):
        raise AdaPrunerError("GGUF export: the model has no final norm beside its layers")
    return owner.norm


def _rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _encoded(tensor: torch.Tensor, outtype: str):
    """(numpy data, GGML type): 1-D tensors (norms, biases) stay f32, as llama.cpp expects; Q8_0 needs rows of whole
    32-blocks, other rows go out as f16."""
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if outtype == "f32" or data.ndim == 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if outtype == "f16" or (outtype == "q8_0" and data.shape[-1] % 32):
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, qtype), qtype
