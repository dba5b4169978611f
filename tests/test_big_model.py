"""A model spread by accelerate over the CPU and disk (`--device-map`) computes what the undispatched one does:
the same cache tensors, trial plans and validation perplexities, and the same saved pruned model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapruner.choosing.spec import PruneSpec
from adapruner.cli import main
from adapruner.model.big_model import Dispatch, is_dispatched, is_offloaded
from adapruner.model.models import load_model
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key
from adapruner.searching.search import TrialConfig, trial_plan, trial_updates
from adapruner.searching.trial_scorer import ValidationScorer
from tests.models import span, tiny_llama, word_level_tokenizer

# layers 1 and 2 and the head on disk, the rest in host memory (accelerate runs the disk ones on the CPU)
CPU_AND_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
PLAIN = ["--device", "cpu", "--dtype", "float32"]  # what the map above runs in, on a machine with a GPU too


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama(6, 2, layers=4).save_pretrained(folder)
    word_level_tokenizer().save_pretrained(folder)
    (tmp_path / "map.json").write_text(json.dumps(CPU_AND_DISK))
    return folder


def spread(model_dir, tmp_path):
    return load_model(
        str(model_dir), dispatch=Dispatch.of(str(tmp_path / "map.json"), None, str(tmp_path / "offload"))
    )[0]


def test_the_map_puts_weights_on_disk(model_dir, tmp_path):
    model = spread(model_dir, tmp_path)
    assert is_dispatched(model) and model.hf_device_map == CPU_AND_DISK
    assert is_offloaded(model.model.layers[1].mlp.down_proj) and not is_offloaded(model.model.layers[0].mlp.down_proj)
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # loaded only inside a forward
    model.save_pretrained(tmp_path / "saved")  # transformers reads the offloaded tensors back for the file
    saved, plain = saved_tensors(tmp_path / "saved"), load_model(str(model_dir))[0].state_dict()
    assert saved.keys() == plain.keys() and all(torch.equal(saved[name], tensor) for name, tensor in plain.items())


def test_cache_trials_and_base_model_equal_the_undispatched_ones(model_dir, tmp_path):
    plain, dispatched = load_model(str(model_dir))[0], spread(model_dir, tmp_path)
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    windows = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))
    caches = []
    for model in (plain, dispatched):
        key = cache_key(
            "tiny", model, CandidatePool(["wiki"], 4, 16, 0), range(1, 4), activations=True, dtype="float32"
        )
        caches.append(build_cache(model, key, ids, [("wiki", i) for i in range(4)], batch_size=2, progress=False))
    assert caches[0].tensors.keys() == caches[1].tensors.keys()
    for name, tensor in caches[0].tensors.items():
        torch.testing.assert_close(caches[1].tensors[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    setting = PruneSpec(0.5, layers=span(range(1, 4)))
    scorers = [ValidationScorer(model, windows, 1) for model in (plain, dispatched)]
    assert scorers[1].base is dispatched  # no copy of a spread model: trials copy the path to their cuts only
    values = set()
    for metric, compensation in (
        ("taylor1", "lsq"),
        ("act", "bias"),
        ("taylor2", "none"),
        ("vector", "lsq"),
        ("l2", "bias"),
    ):
        config = TrialConfig([0, 2, 3], metric, "sum", compensation=compensation)
        plans = [trial_plan(model, cache, setting, config) for model, cache in zip((plain, dispatched), caches)]
        assert plans[0] == plans[1], metric
        ppl = [
            scorer.score(plan, None, trial_updates(model, cache, setting, config, plan))
            for scorer, model, cache, plan in zip(scorers, (plain, dispatched), caches, plans)
        ]
        assert ppl[1] == pytest.approx(ppl[0], rel=1e-6), (metric, compensation)
        values.add(round(ppl[0], 6))
    assert len(values) == 5  # the trials ran their own pruned models (a copy running the base's children would not)
    with torch.no_grad():  # trials leave the spread model whole
        torch.testing.assert_close(dispatched(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert dispatched.model.layers[1].mlp.down_proj.weight.device.type == "meta"


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_model(left, right):
    a, b = saved_tensors(left), saved_tensors(right)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    config_a, config_b = (json.loads((folder / "config.json").read_text()) for folder in (left, right))
    assert {k: v for k, v in config_a.items() if k != "_name_or_path"} == {
        k: v for k, v in config_b.items() if k != "_name_or_path"
    }


def test_cli_search_and_prune_with_a_device_map_equal_the_plain_run(model_dir, tmp_path, capsys):
    spread_flags = [
        "--device-map",
        str(tmp_path / "map.json"),
        "--offload-dir",
        str(tmp_path / "offload"),
        "--dtype",
        "float32",
    ]
    common = ["--model", str(model_dir), "--ratio", "0.5", "--layers", "1:4", "--seq-len", "16"]
    search = [
        *common,
        "--pools",
        "wiki",
        "--pool-size",
        "4",
        "--metrics",
        "taylor1,act",
        "--compensations",
        "none,bias",
        "--allocations",
        "uniform,global",
        "--sample-counts",
        "2,4",
        "--blocks-per-pool",
        "2",
        "--trials",
        "4",
        "--val-windows",
        "3",
        "--batch-size",
        "2",
        "--val-dtype",
        "float32",
    ]  # a spread model validates in its own dtype; auto may pick bf16 for the plain one
    for name, extra in (("plain", PLAIN), ("spread", spread_flags)):
        assert (
            main(
                [
                    "search",
                    *search,
                    *extra,
                    "--cache-dir",
                    str(tmp_path / f"cache-{name}"),
                    "--out",
                    str(tmp_path / f"s-{name}"),
                ]
            )
            == 0
        )
    assert "spread by --device-map" in capsys.readouterr().out
    best = [json.loads((tmp_path / f"s-{name}" / "best.json").read_text()) for name in ("plain", "spread")]
    assert best[0]["plan"] == best[1]["plan"] and best[0]["val_ppl"] == pytest.approx(best[1]["val_ppl"], rel=1e-6)
    assert best[1]["placement"]["device_map"] == str(tmp_path / "map.json")
    for name, extra in (("plain", PLAIN), ("spread", spread_flags)):
        assert (
            main(
                [
                    "prune",
                    "--model",
                    str(model_dir),
                    "--from-study",
                    str(tmp_path / f"s-{name}"),
                    "--no-eval",
                    *extra,
                    "--out",
                    str(tmp_path / f"p-{name}"),
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "prune",
                    *common,
                    "--metric",
                    "taylor1",
                    "--calib",
                    "wiki:3",
                    "--compensate",
                    "lsq",
                    "--allocation",
                    "uniform",
                    *extra,
                    "--out",
                    str(tmp_path / f"q-{name}"),
                ]
            )
            == 0
        )
    assert_same_model(tmp_path / "p-plain", tmp_path / "p-spread")
    assert_same_model(tmp_path / "q-plain", tmp_path / "q-spread")
    reports = [json.loads((tmp_path / f"q-{name}" / "report.json").read_text()) for name in ("plain", "spread")]
    assert reports[0]["ppl_wiki_after"] == pytest.approx(reports[1]["ppl_wiki_after"], rel=1e-6)
    assert reports[1]["placement"]["device_map"] == str(tmp_path / "map.json")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-memory", "cpu=lots"], "--max-memory size"),
        (["--max-memory", "gpu0=1GiB"], "--max-memory entry"),
        (["--device-map", "nowhere.json"], "--device-map 'nowhere.json' is neither"),
    ],
)
def test_bad_dispatch_flags_are_refused_at_parse_time(flags, message, tmp_path, capsys):
    assert main(["search", "--model", "smollm2", *flags, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "s").exists()


MISUSE = [
    (["--max-memory", "cpu=1GiB"], "add --device-map auto"),
    (["--device-map", "auto", "--device", "cpu"], "pass one of them"),
    (["--device-map", "auto", "--max-memory", "7=1GiB"], "name GPU 7"),
    (["--device-map", "MAP", "--max-memory", "cpu=1GiB"], "drop --max-memory"),
    (["--device-map", "auto", "--offload-dir", "FILE"], "is a file"),
]
SEARCH_ONLY = [
    (["--device-map", "auto", "--workers", "2"], "pass --workers 1"),
    (["--device-map", "auto", "--val-dtype", "float16"], "validates in its own dtype"),
]


@pytest.mark.parametrize(
    "command, flags, message",
    [(command, *case) for command in ("search", "run", "prune", "eval") for case in MISUSE]
    + [(command, *case) for command in ("search", "run") for case in SEARCH_ONLY],
)
def test_dispatch_misuse_is_one_line_before_any_model_loads(
    command, flags, message, model_dir, tmp_path, capsys, monkeypatch
):
    import adapruner.model.models

    def no_load(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(adapruner.model.models.AutoModelForCausalLM, "from_pretrained", no_load)
    (tmp_path / "FILE").write_text("not a folder")
    flags = [str(tmp_path / "map.json") if f == "MAP" else str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    args = {
        "search": ["--pools", "wiki", "--seq-len", "16"],
        "run": ["--pools", "wiki", "--seq-len", "16", "--tasks", ""],
        "prune": ["--ratio", "0.5", "--seq-len", "16"],
        "eval": ["--tasks", "", "--seq-len", "16"],
    }[command]
    out = [] if command == "eval" else ["--out", str(tmp_path / "out")]
    assert main([command, "--model", str(model_dir), *args, *flags, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_disk_entries_read_a_safetensors_checkpoint_in_place(model_dir, tmp_path, capsys):
    """Without --offload-dir, accelerate reads a safetensors checkpoint's disk-mapped weights from its own files."""
    common = [
        "--model",
        str(model_dir),
        "--ratio",
        "0.5",
        "--layers",
        "1:4",
        "--calib",
        "wiki:2",
        "--seq-len",
        "16",
        "--no-eval",
        "--allocation",
        "uniform",
    ]
    assert (
        main(
            [
                "prune",
                *common,
                "--device-map",
                str(tmp_path / "map.json"),
                "--dtype",
                "float32",
                "--out",
                str(tmp_path / "spread"),
            ]
        )
        == 0
    )
    assert main(["prune", *common, *PLAIN, "--out", str(tmp_path / "plain")]) == 0
    assert_same_model(tmp_path / "plain", tmp_path / "spread")
    capsys.readouterr()


def test_plan_of_a_spread_model_keeps_the_cache_on_the_host(model_dir, tmp_path, capsys):
    assert (
        main(
            [
                "search",
                "--model",
                str(model_dir),
                "--pools",
                "wiki",
                "--pool-size",
                "4",
                "--seq-len",
                "16",
                "--layers",
                "1:4",
                "--device-map",
                "auto",
                "--max-memory",
                "cpu=20KB",
                "--offload-dir",
                str(tmp_path / "off"),
                "--memory-plan",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "spread by --device-map auto" in out and "memory-mapped in host memory" in out


def test_run_and_eval_with_a_device_map_equal_the_plain_ones(model_dir, tmp_path, capsys, monkeypatch):
    """`run` (search → prune → evaluate) over the CPU+disk map saves the model and reports the perplexities the plain
    run does; `eval` of that pruned directory (adapruner's own model class) spread by `auto` over a small host budget
    and the disk measures what the plain eval does."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spread_flags = [
        "--device-map",
        str(tmp_path / "map.json"),
        "--offload-dir",
        str(tmp_path / "offload"),
        "--dtype",
        "float32",
    ]
    run = [
        "run",
        "--model",
        str(model_dir),
        "--ratio",
        "0.5",
        "--layers",
        "1:4",
        "--seq-len",
        "16",
        "--pools",
        "wiki",
        "--pool-size",
        "2",
        "--trials",
        "2",
        "--val-windows",
        "2",
        "--metrics",
        "l2,act",
        "--allocations",
        "uniform,global",
        "--sample-counts",
        "1,2",
        "--blocks-per-pool",
        "1",
        "--val-dtype",
        "float32",
        "--max-eval-windows",
        "3",
        "--full-seq-len",
        "32",
        "--tasks",
        "",
        "--finetune-steps",
        "0",
    ]
    for name, extra in (("plain", PLAIN), ("spread", spread_flags)):
        assert (
            main([*run, *extra, "--cache-dir", str(tmp_path / f"cache-{name}"), "--out", str(tmp_path / f"run-{name}")])
            == 0
        )
    assert_same_model(tmp_path / "run-plain" / "pruned", tmp_path / "run-spread" / "pruned")
    rows = [json.loads((tmp_path / f"run-{name}" / "report.json").read_text())["rows"] for name in ("plain", "spread")]
    for plain_row, spread_row in zip(*rows):
        assert plain_row["params"] == spread_row["params"]
        assert spread_row["ppl"] == pytest.approx(plain_row["ppl"], rel=1e-6)
    pruned = str(tmp_path / "run-plain" / "pruned")
    evaluation = ["eval", "--model", pruned, "--tasks", "", "--seq-len", "16", "--max-eval-windows", "3"]
    assert main([*evaluation, *PLAIN, "--report", str(tmp_path / "plain.json")]) == 0
    assert (
        main(
            [
                *evaluation,
                "--dtype",
                "float32",
                "--device-map",
                "auto",
                "--max-memory",
                "cpu=20KB",
                "--offload-dir",
                str(tmp_path / "off2"),
                "--report",
                str(tmp_path / "spread.json"),
            ]
        )
        == 0
    )
    measured = [
        json.loads((tmp_path / f"{name}.json").read_text())["eval"]["ppl_wiki_seq16"] for name in ("plain", "spread")
    ]
    assert measured[1]["windows"] == measured[0]["windows"] == 3 and measured[1]["ppl"] == pytest.approx(
        measured[0]["ppl"], rel=1e-6
    )
    assert main([*run, *spread_flags, "--finetune-steps", "2", "--out", str(tmp_path / "refused")]) == 2
    assert "--finetune-steps 0" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_the_backward_reloads_offloaded_weights_instead_of_keeping_them(model_dir, tmp_path):
    """Autograd keeps a reference to each offloaded weight the forward used (layers 1-2: 7 linears and 2 norms each,
    and the head: 19) and loads it again in the backward, which gives the plain model's input gradient."""
    from adapruner.model.big_model import reload_offloaded_in_backward
    from adapruner.scoring.collect import sample_loss

    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    grads, counts = [], []
    for model in (load_model(str(model_dir))[0], spread(model_dir, tmp_path)):
        captured = []

        def keep(_module, _args, out):
            out.requires_grad_(True).retain_grad()
            captured.append(out)

        handle = model.get_input_embeddings().register_forward_hook(keep)
        with reload_offloaded_in_backward(model) as by_reference:
            sample_loss(model, ids).sum().backward()
        handle.remove()
        grads.append(captured[0].grad)
        counts.append(by_reference[0])
    assert counts[0] == 0 and counts[1] >= 19
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_a_tied_model_offloaded_whole_counts_and_digests_as_the_plain_one(tmp_path):
    """With tied embeddings offloaded, accelerate holds embed_tokens and lm_head as separate tensors once the model has
    run; the parameter count and the model digest still count the tied weight once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapruner.choosing.allocation import count_params
    from adapruner.fingerprint import model_digest

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    word_level_tokenizer().save_pretrained(tmp_path / "tied")
    plain, tokenizer = load_model(str(tmp_path / "tied"))
    spread_model = load_model(str(tmp_path / "tied"), dispatch=Dispatch.of("auto", "cpu=20KB", str(tmp_path / "off")))[
        0
    ]
    assert spread_model.hf_device_map == {"": "disk"}
    with torch.no_grad():
        expected = plain(input_ids=torch.tensor([[1, 2, 3]])).logits
        torch.testing.assert_close(spread_model(input_ids=torch.tensor([[1, 2, 3]])).logits, expected)
    assert count_params(spread_model) == count_params(plain) == sum(p.numel() for p in plain.parameters())
    assert model_digest(spread_model, tokenizer) == model_digest(plain, tokenizer)


def test_the_layer_by_layer_output_fisher_of_a_spread_model_is_the_plain_one(model_dir, tmp_path):
    """`collect_output_fisher` runs each layer twice (a recording forward, then with autograd): on a model whose
    layers 1-2 and head sit on disk it gives the plain model's output Fisher."""
    from adapruner.model.structure import output_projections
    from adapruner.scoring.collect import collect_output_fisher

    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(6))
    plain, spread_model = load_model(str(model_dir))[0], spread(model_dir, tmp_path)
    assert is_offloaded(dict(spread_model.named_modules())["model.layers.1.self_attn.o_proj"])
    fishers = [
        collect_output_fisher(model, output_projections(model, range(4)), ids, progress=False, batch_size=2)
        for model in (plain, spread_model)
    ]
    assert fishers[0].keys() == fishers[1].keys() and len(fishers[0]) == 8
    for name, fisher in fishers[0].items():
        assert fisher.abs().sum() > 0
        torch.testing.assert_close(fishers[1][name], fisher, rtol=1e-5, atol=1e-9)
