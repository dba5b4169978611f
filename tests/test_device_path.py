"""The model path on the test device, `--device/--dtype` on the CLI, and device errors as one-line errors."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.spec import PruneSpec
from adapruner.cli import main
from adapruner.devices import Placement, device_errors, resolve_device, resolve_dtype
from adapruner.errors import AdaPrunerError
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key
from adapruner.searching.search import TrialConfig, trial_plan
from adapruner.searching.trial_scorer import ValidationScorer
from tests.helpers import masked_logits
from tests.models import span

SEQ, LAYERS = 11, range(0, 3)
METRICS = ("l2", "taylor1", "vector", "taylor2", "mix", "act")


def cache_on(model, ids):
    key = cache_key(
        "tiny", model, CandidatePool(["a"], ids.shape[0], SEQ, 0), LAYERS, activations=True, dtype="float32"
    )
    return build_cache(model, key, ids, [("a", i) for i in range(ids.shape[0])], progress=False)


@pytest.mark.parametrize("metric", METRICS)
def test_trial_on_the_device_equals_the_cpu_trial(gqa_model, metric, device):
    """Cache build, importance (Triton on CUDA), plan and validation score on `device` match the CPU fp32 run."""
    ids = torch.randint(0, 97, (6, SEQ), generator=torch.Generator().manual_seed(3))
    val = torch.randint(0, 97, (4, SEQ), generator=torch.Generator().manual_seed(4))
    setting, config = PruneSpec(0.5, layers=span(LAYERS)), TrialConfig([0, 2, 3], metric, "sum")
    cpu_model = copy.deepcopy(gqa_model)
    expected_plan = trial_plan(cpu_model, cache_on(cpu_model, ids), setting, config)
    expected_ppl = ValidationScorer(cpu_model, val, LAYERS.start).score(expected_plan)
    model = gqa_model.to(device)
    cache = cache_on(model, ids)
    assert cache.device.type == device.type
    plan = trial_plan(model, cache, setting, config)
    assert plan == expected_plan
    assert ValidationScorer(model, val, LAYERS.start).score(plan) == pytest.approx(expected_ppl, rel=1e-4)


def test_a_cache_over_its_budget_is_staged_in_host_memory(gqa_model, device):
    ids = torch.randint(0, 97, (6, SEQ), generator=torch.Generator().manual_seed(3))
    model = gqa_model.to(device)
    key = cache_key("tiny", model, CandidatePool(["a"], 6, SEQ, 0), LAYERS, activations=True, dtype="float32")
    addresses = [("a", i) for i in range(6)]
    resident = build_cache(model, key, ids, addresses, batch_size=2, progress=False)
    staged = build_cache(
        model, key, ids, addresses, batch_size=2, progress=False, device_budget_bytes=resident.nbytes // 2
    )
    assert resident.device.type == device.type and {t.device.type for t in staged.tensors.values()} == {"cpu"}
    for name, tensor in resident.tensors.items():
        torch.testing.assert_close(staged.tensors[name], tensor.cpu())
    config = TrialConfig([1, 4], "taylor1", "sum")  # a host cache scores on the model's device: rows staged per trial
    assert trial_plan(model, staged, PruneSpec(0.5, layers=span(LAYERS)), config) == trial_plan(
        model, resident, PruneSpec(0.5, layers=span(LAYERS)), config
    )


def test_cli_prune_and_search_in_bfloat16(gqa_model, tokenizer, tmp_path, capsys):
    """--device cpu --dtype bfloat16: the saved pruned model equals the dense bf16 model with the removed units
    masked, within two bf16 rounding steps of the logits' scale (the two compute the same sums in other orders)."""
    model_dir = tmp_path / "tiny"
    gqa_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--recipe", "paper", "--ratio", "0.5", "--layers", "0:3", "--device", "cpu"]
    common += ["--dtype", "bfloat16"]
    assert (
        main(
            [
                "prune",
                *common,
                "--metric",
                "taylor1",
                "--calib",
                "wiki:2",
                "--seq-len",
                "16",
                "--no-eval",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["placement"] == {"device": "cpu", "dtype": "bfloat16"} and report["backends"] == {
        "importance": "torch",
        "gather": "torch",
    }
    plan = PrunePlan.from_dict(report["plan"])
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p", trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert next(pruned.parameters()).dtype == torch.bfloat16
    tokens = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    expected = masked_logits(gqa_model.to(torch.bfloat16), plan, tokens).float()
    with torch.no_grad():
        got = pruned(input_ids=tokens).logits.float()
    bound = 2 * 2**-8 * expected.abs().max().item()
    assert (got - expected).abs().max().item() <= bound

    search = [
        "--pools",
        "wiki",
        "--pool-size",
        "2",
        "--seq-len",
        "16",
        "--metrics",
        "taylor1,l2",
        "--sample-counts",
        "1,2",
        "--blocks-per-pool",
        "1",
        "--trials",
        "2",
        "--val-windows",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(["search", *common, *search, "--out", str(tmp_path / "s")]) == 0
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    assert best["placement"]["device"] == "cpu" and best["placement"]["dtype"] == "bfloat16"
    assert best["backends"]["gather"] == "torch" and best["val_ppl"] > 1
    capsys.readouterr()


def test_device_and_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert Placement.of("cpu", "bfloat16").describe() == {"device": "cpu", "dtype": "bfloat16"}
    with pytest.raises(AdaPrunerError, match="only .* CUDA device|no CUDA device"):
        resolve_device("cuda:99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    assert (
        main(
            [
                "prune",
                "--model",
                "smollm2",
                "--device",
                "cuda",
                "--metric",
                "l2",
                "--no-eval",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --device cpu" in err and not (tmp_path / "o").exists()


def test_bad_device_spelling_is_refused_at_parse_time(capsys):
    assert main(["eval", "--model", "smollm2", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --device: 'tpu' is not a device") and err.count("\n") == 1


def test_out_of_memory_becomes_a_one_line_error(monkeypatch, capsys, tmp_path):
    def exhausted(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("adapruner.commands.prune.load_placed", exhausted)
    assert (
        main(
            [
                "prune",
                "--model",
                "smollm2",
                "--metric",
                "l2",
                "--no-eval",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size" in err and "--device cpu" in err and not (tmp_path / "o").exists()
    with pytest.raises(ValueError):  # other errors pass through untouched
        with device_errors():
            raise ValueError("not a device error")


def test_windows_longer_than_the_context_are_refused(gqa_model, tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "tiny"  # max_position_embeddings 64
    gqa_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    capsys.readouterr()
    code = main(
        [
            "prune",
            "--model",
            str(model_dir),
            "--metric",
            "l2",
            "--seq-len",
            "100",
            "--no-eval",
            "--out",
            str(tmp_path / "p"),
        ]
    )
    errors = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")
    ]  # besides the loader's progress bars
    assert code == 2 and len(errors) == 1 and "--seq-len 100 exceeds the model's context of 64 tokens" in errors[0]
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked host memory needs CUDA")
def test_a_pinned_cache_scores_as_the_resident_one(gqa_model, device, tmp_path):
    """The pinned tier: rows gathered into pinned buffers and copied without blocking give the resident cache's
    plans and compensation moments."""
    from adapruner.scoring.cache import ActivationCache, rows_on

    ids = torch.randint(0, 97, (6, SEQ), generator=torch.Generator().manual_seed(3))
    model = gqa_model.to(device)
    resident = cache_on(model, ids)
    resident.save(tmp_path / "c.safetensors")
    pinned = ActivationCache.load(tmp_path / "c.safetensors", 0, device, pin=True)
    assert pinned.pinned and pinned.device.type == "cpu"
    rows = torch.tensor([5, 0, 17, 3])
    for name in ("x/model.layers.1.mlp.gate_proj", "dy/model.layers.2.self_attn.q_proj"):
        torch.testing.assert_close(rows_on(pinned.tensors[name], rows, device), resident.tensors[name][rows.to(device)])
    for metric in ("taylor1", "mix", "taylor2"):
        config = TrialConfig([1, 4, 5], metric, "sum")
        assert trial_plan(model, pinned, PruneSpec(0.5, layers=span(LAYERS)), config) == trial_plan(
            model, resident, PruneSpec(0.5, layers=span(LAYERS)), config
        )
    samples = torch.tensor([0, 3])
    gram_pinned = pinned.input_moments("model.layers.1.mlp.down_proj", samples, device, gram=True).gram
    gram_resident = resident.input_moments("model.layers.1.mlp.down_proj", samples, device, gram=True).gram
    torch.testing.assert_close(gram_pinned, gram_resident)
