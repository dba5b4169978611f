"""GGUF export: the file's per-layer sizes equal the saved model's config; in a real llama.cpp runtime the dense and
a pruned SmolLM2 (per-layer widths from the global allocation, lsq output biases) give transformers' perplexity on
the same windows and the same greedy continuation; bad input is one line with nothing written."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import plan_allocation, plan_pruning
from adapruner.choosing.spec import PruneSpec
from adapruner.cli import main
from adapruner.commands.export import export_model
from adapruner.cutting.pruning import PruneOptions, prune_model
from adapruner.cutting.removal import apply_plan
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.llama_cpp_ppl import llama_cpp_nll
from adapruner.model.structure import decoder_layers
from adapruner.output.export import export_gguf
from adapruner.output.saving import save_pruned
from adapruner.scoring.importance import Importance
from tests.helpers import byte_level_tokenizer, one_error_line, tiny_family
from tests.models import tiny_llama

gguf = pytest.importorskip("gguf")
LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not LLAMA_CPP, reason="llama-cpp-python is not installed here (.ci/run builds it: pip install -e '.[llamacpp]')"
)
WINDOWS = 6
SEQ = 128


def field(reader, key):
    value = reader.fields[key].contents()
    return list(value) if isinstance(value, list) else value


def test_per_layer_sizes_in_the_file_equal_the_saved_config(tmp_path):
    model = tiny_llama(n_heads=4, n_kv=2, layers=3)
    spec = PruneSpec(None, target_params=0.25, layers="all", allocation="global", metric="l2", min_keep=0.2)
    apply_plan(model, plan_allocation(model, Importance("l2"), spec))
    save_pruned(model, byte_level_tokenizer(), tmp_path / "pruned")
    export_model(str(tmp_path / "pruned"), tmp_path / "pruned.gguf")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    reader = gguf.GGUFReader(tmp_path / "pruned.gguf")
    assert field(reader, "general.architecture") == "deci"
    assert field(reader, "deci.attention.head_count") == config["num_attention_heads_per_layer"]
    assert field(reader, "deci.attention.head_count_kv") == config["num_key_value_heads_per_layer"]
    assert field(reader, "deci.feed_forward_length") == config["intermediate_size_per_layer"]
    assert len(set(config["intermediate_size_per_layer"])) > 1  # the allocation did give layers different widths


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}/not-a-model", "--gguf", "{tmp}/a.gguf"], "cannot load model"),
        (["smollm2", "--gguf", "{tmp}/a.gguf", "--outtype", "q4"], "invalid choice: 'q4'"),
        (["smollm2", "--gguf", "{tmp}/exists.gguf"], "already exists"),
        (["smollm2", "--gguf", "{tmp}/a.bin"], "name the file *.gguf"),
    ],
)
def test_bad_export_input_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    (tmp_path / "exists.gguf").write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["export", *(a.format(tmp=tmp_path) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2 and one_error_line(err, message), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "exists.gguf").read_text() == "keep me"


def transformers_nll(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    return float(-logp.gather(2, windows[:, 1:, None]).mean())


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def compare_in_llama_cpp(model, tokenizer, path, windows, ppl_tolerance: float, greedy: bool = True) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2 * SEQ, n_batch=SEQ, logits_all=True, verbose=False, n_threads=2)
    ours, theirs = transformers_nll(model, windows), llama_cpp_nll(llm, windows)
    assert abs(np.exp(theirs) / np.exp(ours) - 1) < ppl_tolerance, (np.exp(ours), np.exp(theirs))
    if greedy:
        prompt = windows[0, :32]
        with torch.no_grad():
            expected = model.generate(prompt[None], max_new_tokens=32, do_sample=False)[0, 32:].tolist()
        assert llama_cpp_greedy(llm, prompt.tolist(), 32) == expected


@pytest.fixture
def eval_windows(smollm2):
    from adapruner.commands.eval import eval_windows as windows_of

    return windows_of(smollm2[1], "wiki", SEQ, WINDOWS)


@needs_llama_cpp
@pytest.mark.smollm2
def test_dense_smollm2_in_llama_cpp_matches_transformers(smollm2, eval_windows, tmp_path):
    model, tokenizer = smollm2
    export_gguf(model, tokenizer, tmp_path / "dense.gguf", "f32")
    compare_in_llama_cpp(model, tokenizer, tmp_path / "dense.gguf", eval_windows, 0.005)
    export_gguf(model, tokenizer, tmp_path / "dense-f16.gguf", "f16")
    compare_in_llama_cpp(model, tokenizer, tmp_path / "dense-f16.gguf", eval_windows, 0.01, greedy=False)


@needs_llama_cpp
@pytest.mark.smollm2
def test_pruned_smollm2_with_per_layer_widths_and_biases_in_llama_cpp_matches_transformers(
    smollm2, eval_windows, tmp_path
):
    model, tokenizer = smollm2
    spec = PruneSpec(None, target_params=0.2, allocation="global", metric="l2", compensation="lsq")
    result = prune_model(model, tokenizer, PruneOptions(spec, calib="wiki:4", seq_len=64), progress=False)
    assert result.compensated  # o_proj/down_proj biases go out as attn_output.bias / ffn_down.bias
    save_pruned(model, tokenizer, tmp_path / "pruned")
    export_model(str(tmp_path / "pruned"), tmp_path / "pruned.gguf")
    reader = gguf.GGUFReader(tmp_path / "pruned.gguf")
    assert field(reader, "general.architecture") == "deci" and "blk.5.ffn_down.bias" in {t.name for t in reader.tensors}
    compare_in_llama_cpp(model, tokenizer, tmp_path / "pruned.gguf", eval_windows, 0.005)
    export_gguf(model, tokenizer, tmp_path / "pruned-f16.gguf", "f16")
    compare_in_llama_cpp(model, tokenizer, tmp_path / "pruned-f16.gguf", eval_windows, 0.01, greedy=False)


@needs_llama_cpp
def test_llama3_rope_scaling_goes_out_as_rope_freqs(tmp_path):
    """A tiny Llama with Llama-3.1's RoPE scaling (a short original context, so the scaling bites) and per-layer widths:
    llama.cpp's logits equal transformers' on a window longer than that context."""
    import llama_cpp
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rope_parameters=rope,
    )
    model = LlamaForCausalLM(config).eval()
    apply_plan(
        model,
        plan_allocation(
            model, Importance("l2"), PruneSpec(None, target_params=0.2, layers="all", allocation="global", metric="l2")
        ),
    )
    export_gguf(model, byte_level_tokenizer(), tmp_path / "tiny.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}
    window = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=window).logits[0].float()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "tiny.gguf"), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    llm.eval(window[0].tolist())
    got = torch.from_numpy(np.array(llm.scores[:64], dtype=np.float32))
    assert (got - expected).abs().max() / expected.abs().max() < 1e-3


def exact_llama_cpp(path, n_ctx: int):
    """llama.cpp with its KV cache in f32 (type 0; the default f16 cache rounds keys and values to ~1e-3)."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=0,
        type_v=0,
    )


def llama_cpp_logits(path, window: torch.Tensor) -> torch.Tensor:
    n = window.shape[-1]
    llm = exact_llama_cpp(path, n)
    llm.eval(window[0].tolist())
    return torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))


@needs_llama_cpp
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "refit-bias"])
def test_removed_blocks_in_llama_cpp_match_transformers(biased, tmp_path):
    """A tiny Llama whose layer 1 lost its attention, layer 2 its MLP and layers 3 and 4 (the last) both: `deci` with
    head_count 0 / feed_forward_length 0 and no tensors where llama.cpp's graph skips the block; one zero-valued unit
    where it would not (a removed block with the refit's bias; an MLP removed below a kept attention or in the last
    layer). llama.cpp's logits equal transformers'."""
    model = tiny_llama(4, 2, layers=5)
    apply_plan(model, PrunePlan({1: ([], []), 3: ([], []), 4: ([], [])}, {2: [], 3: [], 4: []}))
    if biased:
        with torch.no_grad():
            for linear in (model.model.layers[1].self_attn.o_proj, model.model.layers[3].mlp.down_proj):
                linear.bias = torch.nn.Parameter(torch.randn(linear.out_features) * 0.5)
    export_gguf(model, byte_level_tokenizer(), tmp_path / "removed.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "removed.gguf")
    names = {t.name for t in reader.tensors}
    assert field(reader, "general.architecture") == "deci"
    heads, channels = field(reader, "deci.attention.head_count"), field(reader, "deci.feed_forward_length")
    assert (heads[1], channels[2], heads[3], channels[3], channels[4]) == (
        (1, 1, 0, 1, 1) if biased else (0, 1, 0, 0, 1)
    )
    assert ("blk.1.attn_q.weight" in names, "blk.3.ffn_up.weight" in names) == (biased, biased)
    window = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=window).logits[0].float()
    got = llama_cpp_logits(tmp_path / "removed.gguf", window)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-3


EXPORTED = {  # model_type → (llama.cpp architecture, config overrides): every family the export writes
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "granite": ("granite", {}),
    "smollm3": ("smollm3", {}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "glm4": ("glm4", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3", {}),
    "gemma3": ("gemma3", {}),  # the multimodal checkpoint: its language model
    "mixtral": ("llama", {}),
    "qwen3_moe": ("qwen3moe", {"norm_topk_prob": True}),  # llama.cpp's qwen3moe renormalises (Qwen3-30B-A3B does)
    "qwen2_moe": ("qwen2moe", {}),
}
WHOLE_ATTENTION = {"qwen2", "qwen2_moe", "phi3", "olmo2"}  # llama.cpp sizes their attention by the hidden width


@needs_llama_cpp
@pytest.mark.parametrize("model_type", EXPORTED)
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "uniform"])
def test_each_family_goes_out_as_its_own_llama_cpp_architecture(model_type, pruned, tmp_path):
    """qwen2 (q/k/v biases) and qwen3 (q/k norms over head_dim) rotate halves as transformers does; llama rotates
    pairs; MoE experts go out as `ffn_*_exps` with the router (Qwen2-MoE's shared expert too). Dense, and pruned to
    one size per layer (heads kept where llama.cpp sizes the attention by the hidden width): llama.cpp's logits (its
    KV cache in f32) equal transformers' and greedy decoding continues the same way."""
    arch, overrides = EXPORTED[model_type]
    model = tiny_family(model_type, **overrides)
    if pruned:
        heads = model_type not in WHOLE_ATTENTION
        apply_plan(model, plan_pruning(model, Importance("l2"), 0.5, range(0, 4), "kv", prune_attention=heads))
    export_gguf(model, byte_level_tokenizer(), tmp_path / "m.gguf", "f32")
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "general.architecture") == arch
    if model_type.startswith("gemma"):
        with_ggml_gelu(model)
    window = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=window).logits[0].float()
    got = llama_cpp_logits(tmp_path / "m.gguf", window)
    # measured: ≤ 1.6e-6; Gemma 1.7e-5 / 1.4e-4 (ggml's GELU table, emulated above only to the fp16 value)
    tolerance = 1e-3 if model_type.startswith("gemma") else 1e-5
    assert (got - expected).abs().max() / expected.abs().max() < tolerance
    prompt = window[0, :8]
    with torch.no_grad():
        continued = model.generate(prompt[None], max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    assert llama_cpp_greedy(exact_llama_cpp(tmp_path / "m.gguf", 64), prompt.tolist(), 16) == continued


class Fp16Table(torch.nn.Module):
    """An activation evaluated as ggml's CPU GELU is: looked up by the fp16 value of its input, returned in fp16."""

    def __init__(self, act: torch.nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x.half().float()).half().float()


def with_ggml_gelu(model) -> None:
    """The Gemma MLPs' GELU as llama.cpp computes it on a CPU (without it the logits differ by ~1e-3, measured; with
    it by ~1e-5: the layout is exact)."""
    for layer in decoder_layers(model):
        layer.mlp.act_fn = Fp16Table(layer.mlp.act_fn)


def test_qwen2_heads_cannot_go_out_and_say_so():
    model = tiny_family("qwen2")
    apply_plan(model, plan_pruning(model, Importance("l2"), 0.5, range(0, 4), "kv"))
    with pytest.raises(AdaPrunerError, match="qwen2 sizes its attention by the hidden width.*--no-attention"):
        export_gguf(model, byte_level_tokenizer(), "unused.gguf", "f32")


def test_a_routing_llama_cpp_does_not_compute_is_refused():
    with pytest.raises(AdaPrunerError, match="qwen3moe graph renormalises .* norm_topk_prob=False"):
        export_gguf(tiny_family("qwen3_moe"), byte_level_tokenizer(), "unused.gguf", "f32")


def test_per_layer_widths_of_a_family_without_deci_are_one_line_and_nothing_written(tmp_path, capsys):
    model = tiny_family("qwen3")
    apply_plan(model, plan_pruning(model, Importance("l2"), 0.5, range(1, 2), "kv"))  # layer 1 alone: two sizes
    save_pruned(model, byte_level_tokenizer(), tmp_path / "pruned")
    capsys.readouterr()
    code = main(["export", str(tmp_path / "pruned"), "--gguf", str(tmp_path / "p.gguf")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert code == 2 and last.startswith("error: GGUF export: llama.cpp's qwen3 takes layers of one size"), last
    assert not (tmp_path / "p.gguf").exists() and not (tmp_path / "p.Modelfile").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def k_quant_model(channels: list[int]):
    """A random Llama whose rows are whole K-quant super-blocks (hidden 256, 4 heads of 64) but for the MLP widths
    `channels` per layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=len(channels),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    apply_plan(model, PrunePlan({}, {i: list(range(n)) for i, n in enumerate(channels)}))
    return model


@needs_llama_cpp
@pytest.mark.parametrize(
    ("channels", "outtype"),
    [
        ([300, 512], "q4_k_m"),
        ([256, 512], "q4_k_m"),
        ([300, 512], "q6_k"),
        ([288, 512], "q6_k"),
        ([288, 512], "q5_k_m"),
    ],
)
def test_quantized_exports_run_and_report_the_widths_that_fell_back(channels, outtype, tmp_path):
    """llama.cpp's quantizer writes the file; the tensors reported as fallen back are exactly the 2-D ones whose rows
    are not whole 256-value super-blocks (here layer 0's ffn_down at 300 channels, to F16, or 288, to Q8_0 or Q5_1;
    none at 256, as --align 256 would keep it); the file loads and computes nearly transformers' logits."""
    from adapruner.output.quantize import SUPER_BLOCK

    model = k_quant_model(channels)
    found = export_gguf(model, byte_level_tokenizer(), tmp_path / "q.gguf", outtype)
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    odd = {t.name for t in reader.tensors if len(t.shape) == 2 and int(t.shape[0]) % SUPER_BLOCK}
    assert {f.name for f in found} == odd == ({"blk.0.ffn_down.weight"} if channels[0] % SUPER_BLOCK else set())
    assert all(f.width == channels[0] for f in found)
    assert any(t.tensor_type.name.endswith("_K") for t in reader.tensors)
    window = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=window).logits[0].float()
    got = llama_cpp_logits(tmp_path / "q.gguf", window)
    assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.98


@needs_llama_cpp
def test_export_command_quantizes_reports_and_writes_a_modelfile(tmp_path, capsys):
    save_pruned(k_quant_model([300, 512]), byte_level_tokenizer(), tmp_path / "pruned")
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "pruned"), "--gguf", str(out), "--outtype", "q4_k_m"]) == 0
    printed = capsys.readouterr().out
    assert "1 MLP down projections fell back from K-quants: rows of 300 values, not multiples of 256" in printed
    assert "--align 256" in printed and "hidden width" not in printed
    assert (tmp_path / "m.Modelfile").read_text().startswith("FROM ./m.gguf\n")


def test_the_modelfile_carries_the_chat_template_and_stop_tokens():
    from adapruner.output.modelfile import modelfile_text

    tokenizer = byte_level_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    chatml = modelfile_text("m.gguf", tokenizer)
    assert chatml.splitlines()[0] == "FROM ./m.gguf" and 'TEMPLATE """{{- range .Messages }}<|im_start|>' in chatml
    assert [line for line in chatml.splitlines() if line.startswith("PARAMETER")] == [
        'PARAMETER stop "<|im_start|>"',
        'PARAMETER stop "<|im_end|>"',
        'PARAMETER stop "<|endoftext|>"',
    ]
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"
    other = modelfile_text("m.gguf", tokenizer)
    assert 'TEMPLATE "' not in other and "# TEMPLATE: ollama reads the chat template" in other
    assert other.splitlines()[-1] == 'PARAMETER stop "<|endoftext|>"'


def test_the_importance_matrix_is_the_mean_squared_input_of_each_projection():
    """Layer 0's q/k/v read the first norm of the embeddings: mean over tokens of that input squared, by hand; every
    entry has its weight's input width."""
    from adapruner.output.imatrix import imatrix_of

    model = k_quant_model([300, 512])
    windows = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))
    matrix = imatrix_of(model, windows, batch_size=2)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(windows)).reshape(-1, 256)
    for name in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(matrix[f"blk.0.{name}.weight"], (x * x).mean(0).numpy(), rtol=1e-5)
    assert {name: values.shape[0] for name, values in matrix.items() if name.startswith("blk.0.")} == {
        **{f"blk.0.{n}.weight": 256 for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")},
        "blk.0.ffn_down.weight": 300,
    }


@needs_llama_cpp
def test_an_importance_matrix_weighs_the_rounding_toward_the_calibration_inputs(tmp_path):
    """Q4_K_M with and without the importance matrix m of some windows: for every projection whose rows go out
    unpermuted, the weighted rounding error Σ_rows Σ_j m_j (w − q)_j² — what llama.cpp's quantizer minimises with an
    imatrix — is lower in the weighted file; both files load and run."""
    from adapruner.output.imatrix import imatrix_of

    model = k_quant_model([512, 512])
    windows = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(3))
    export_gguf(model, byte_level_tokenizer(), tmp_path / "plain.gguf", "q4_k_m")
    export_gguf(model, byte_level_tokenizer(), tmp_path / "weighted.gguf", "q4_k_m", imatrix_windows=windows)
    matrix = imatrix_of(model, windows)
    files = {name: gguf.GGUFReader(tmp_path / f"{name}.gguf") for name in ("plain", "weighted")}
    weights = {
        f"blk.{i}.{gguf_name}.weight": getattr(getattr(layer, block), linear).weight.detach().numpy()
        for i, layer in enumerate(model.model.layers)
        for gguf_name, block, linear in (
            ("attn_v", "self_attn", "v_proj"),
            ("attn_output", "self_attn", "o_proj"),
            ("ffn_gate", "mlp", "gate_proj"),
            ("ffn_up", "mlp", "up_proj"),
            ("ffn_down", "mlp", "down_proj"),
        )
    }
    for name, weight in weights.items():
        errors = {}
        for kind, reader in files.items():
            tensor = next(t for t in reader.tensors if t.name == name)
            rounded = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
            errors[kind] = float((((weight - rounded) ** 2) * matrix[name]).sum())
        assert errors["weighted"] < errors["plain"], (name, errors)
    for kind in files:
        assert torch.isfinite(llama_cpp_logits(tmp_path / f"{kind}.gguf", windows[:1])).all()


def test_an_importance_matrix_without_quantization_is_one_line(tmp_path, capsys):
    code = main(["export", "smollm2", "--gguf", str(tmp_path / "a.gguf"), "--outtype", "f16", "--imatrix", "wiki:4"])
    err = capsys.readouterr().err
    assert code == 2 and one_error_line(err, "--imatrix weighs llama.cpp's quantizer"), err
    assert list(tmp_path.iterdir()) == []


def test_a_family_without_a_llama_cpp_architecture_is_one_line_and_nothing_written(tmp_path, capsys):
    """A derived family (Ministral) reaches llama.cpp through no table entry: one line naming the families written."""
    tiny_family("ministral").save_pretrained(tmp_path / "model")
    byte_level_tokenizer().save_pretrained(tmp_path / "model")
    capsys.readouterr()
    code = main(["export", str(tmp_path / "model"), "--gguf", str(tmp_path / "m.gguf")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert code == 2 and last.startswith("error: GGUF export writes llama, mistral, qwen2"), last
    assert "ministral needs a llama.cpp architecture" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
