"""GGUF export: the file's per-layer sizes equal the saved model's config; in a real llama.cpp runtime the dense and
a pruned SmolLM2 (per-layer widths from the global allocation, lsq output biases) give transformers' perplexity on
the same windows and the same greedy continuation; bad input is one line with nothing written."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import plan_allocation
from adapruner.choosing.spec import PruneSpec
from adapruner.cli import main
from adapruner.commands.export import export_model
from adapruner.cutting.pruning import PruneOptions, prune_model
from adapruner.cutting.removal import apply_plan
from adapruner.output.export import export_gguf
from adapruner.output.saving import save_pruned
from adapruner.scoring.importance import Importance
from tests.helpers import byte_level_tokenizer, one_error_line
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


def llama_cpp_nll(llm, windows: torch.Tensor) -> float:
    total = 0.0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32))
        total += float(-torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None]).sum())
    return total / (windows.shape[0] * (windows.shape[1] - 1))


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


def llama_cpp_logits(path, window: torch.Tensor) -> torch.Tensor:
    import llama_cpp

    n = window.shape[-1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n, n_batch=n, logits_all=True, verbose=False, n_threads=2)
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
