"""The CLI: bad input → one line on stderr, exit 2, nothing written; end to end on the real SmolLM2-135M."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.spec import PruneSpec
from adapruner.cli import (
    apply_recipe,
    build_parser,
    eval_options,
    lora_options,
    prune_eval_options,
    prune_options,
    renamed,
    run_options,
    search_options,
)
from adapruner.commands.eval import EvalOptions
from adapruner.commands.run import RunOptions
from adapruner.cutting.pruning import PruneOptions, prune_model
from adapruner.data.calibration import pool_windows
from adapruner.evaluation.evaluate import perplexity
from adapruner.evaluation.finetune import LoraOptions
from adapruner.model.structure import layer_info
from adapruner.output.saving import save_pruned
from adapruner.recipes import recipe_prune_options, recipe_search_options
from adapruner.searching.search_options import SearchOptions
from adapruner.searching.trial_scorer import VAL_DTYPES, resolve_val_dtype
from tests.helpers import one_error_line, run_cli


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "/no/such/model"], "does not exist"),
        (["--model", "smollm2", "--ratio", "1.5"], "outside (0, 1)"),
        pytest.param(
            ["--model", "smollm2", "--ratio", "0.95"], "would remove all 3 key/value groups", marks=pytest.mark.smollm2
        ),
        pytest.param(["--model", "smollm2", "--calib", "wiki:100000"], "ask for at most", marks=pytest.mark.smollm2),
        (["--model", "smollm2", "--calib", "atlantis:4"], "unknown pool 'atlantis'"),
        pytest.param(["--model", "smollm2", "--target-params", "0.99"], "out of reach", marks=pytest.mark.smollm2),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        "prune",
        *argv,
        "--recipe",
        "paper",
        "--metric",
        "l2" if "--calib" not in argv else "taylor1",
        "--no-eval",
        "--out",
        str(out),
    )
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_uniform_under_the_default_recipe_names_the_flags_to_pass(capsys, tmp_path):
    code, _, err = run_cli(capsys, "prune", "--model", "smollm2", "--stock-config", "--out", str(tmp_path / "out"))
    assert code == 2 and one_error_line(err, "pass --allocation uniform --compensate none (or --recipe paper)")
    assert list(tmp_path.iterdir()) == []


def parsed(*argv: str):
    """The namespace `main` hands a command: flags parsed, then the rest filled from --recipe."""
    args = build_parser().parse_args(argv)
    apply_recipe(args)
    return args


def test_cli_defaults_are_the_best_recipe_and_the_paper_is_the_settings_objects():
    """No flag gives the measured best recipe; `--recipe paper` gives the settings objects' own (plain) defaults, so
    each default is written once: in the object, or in the recipe."""
    assert search_options(parsed("search", "--out", "o")) == recipe_search_options("best")
    assert run_options(parsed("run", "--out", "o")) == RunOptions(recipe_search_options("best"))
    prune = parsed("prune", "--model", "m", "--out", "o")
    assert prune_options(prune) == recipe_prune_options("best") and prune_eval_options(prune) == EvalOptions()
    assert search_options(parsed("search", "--recipe", "paper", "--out", "o")) == SearchOptions()
    assert run_options(parsed("run", "--recipe", "paper", "--out", "o")) == RunOptions(SearchOptions())
    assert prune_options(parsed("prune", "--recipe", "paper", "--model", "m", "--out", "o")) == PruneOptions()
    flap = prune_options(parsed("prune", "--recipe", "flap", "--metric", "act", "--model", "m", "--out", "o"))
    assert flap == recipe_prune_options("flap", metric="act")  # a flag overrides its recipe's value
    none = search_options(parsed("search", "--refit-calib", "none", "--statistics", "subset", "--out", "o"))
    assert none == recipe_search_options("best", refit_calib=None, statistics=("subset",))
    assert search_options(parsed("search", "--refit-calib", "none", "--out", "o")) == none  # no pool: subsets
    assert lora_options(parsed("finetune", "--model", "m", "--out", "o")) == LoraOptions()
    assert eval_options(parsed("eval", "--model", "m")) == EvalOptions()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--pool-size", "0"], "argument --pool-size: 0 is below its minimum 1"),
        (["search", "--val-windows", "-3"], "argument --val-windows: -3 is below its minimum 1"),
        (["search", "--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
        (["search", "--ratio", "1.2"], "argument --ratio: 1.2 is outside (0, 1)"),
        (["search", "--depth-slope", "1.5"], "argument --depth-slope: 1.5 is outside [0, 1)"),
        (["search", "--seq-len", "1"], "argument --seq-len: 1 is below its minimum 2"),
        (["run", "--finetune-steps", "-1"], "argument --finetune-steps: -1 is below its minimum 0"),
        (["finetune", "--model", "m", "--lora-r", "0"], "argument --lora-r: 0 is below its minimum 1"),
        (["finetune", "--model", "m", "--lr", "0"], "argument --lr: 0.0 is below its minimum 1e-12"),
        (["finetune", "--model", "m", "--eval-every", "0"], "argument --eval-every: 0 is below its minimum 1"),
        (["prune", "--model", "m", "--target-params", "0"], "argument --target-params: 0.0 is outside (0, 1)"),
        (["eval", "--model", "m", "--batch-size", "0"], "argument --batch-size: 0 is below its minimum 1"),
        (["prune", "--model", "m", "--damp", "0"], "argument --damp: 0.0 is below its minimum 1e-12"),
        (["search", "--min-keep", "1"], "argument --min-keep: 1.0 is outside [0, 1)"),
        (
            ["search", "--target-params", "0.2", "--ratio", "0.3"],
            "argument --ratio: not allowed with argument --target-params",
        ),
        (["prune", "--model", "m", "--allocation", "magic"], "argument --allocation: invalid choice: 'magic'"),
    ],
)
def test_numeric_flags_are_range_checked_at_parse_time(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *argv, *(["--out", str(out)] if argv[0] != "eval" else []))
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_architecture_and_existing_out(capsys, tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run_cli(capsys, "prune", "--model", str(gpt2), "--out", str(tmp_path / "o"))
    assert code == 2 and "unsupported architecture 'gpt2'" in err
    code, _, err = run_cli(capsys, "prune", "--model", "smollm2", "--out", str(gpt2))
    assert code == 2 and "already exists" in err


def test_smollm2_prune_save_reload(smollm2, tmp_path):
    model, tokenizer = smollm2
    options = PruneOptions(PruneSpec(0.25, metric="taylor1"), calib="wiki:4", seq_len=64)
    result = prune_model(model, tokenizer, options, progress=False)
    assert result.layers == list(range(4, 28)) and len(result.calib_addresses) == 4
    info = layer_info(model, 10)
    assert (info.n_heads, info.n_kv_heads, info.intermediate) == (6, 2, 1152)
    assert layer_info(model, 0).n_heads == 9  # first layers stay whole
    out = save_pruned(model, tokenizer, tmp_path / "smol")
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokens = pool_windows(tokenizer, "wiki", 64, "eval")[:2]
    with torch.no_grad():
        gap = (model(input_ids=tokens).logits - loaded(input_ids=tokens).logits).abs().max().item()
    assert gap < 1e-4


def test_smollm2_uniform_cli_saves_a_stock_model(capsys, tmp_path, smollm2_loaded):
    out = tmp_path / "uniform"
    code, stdout, _ = run_cli(
        capsys,
        "prune",
        "--model",
        "smollm2",
        "--recipe",
        "paper",
        "--ratio",
        "0.25",
        "--metric",
        "l2",
        "--stock-config",
        "--max-eval-windows",
        "2",
        "--out",
        str(out),
    )
    assert code == 0 and "ppl wiki" in stdout
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is LlamaForCausalLM
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads, loaded.config.intermediate_size) == (
        6,
        2,
        1152,
    )
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] == sum(p.numel() for p in loaded.parameters())
    code, stdout, _ = run_cli(capsys, "eval", "--model", str(out), "--max-eval-windows", "2")
    assert code == 0 and "ppl_wiki_seq128" in stdout
    evaluated = json.loads((out / "report.json").read_text())["eval"]["ppl_wiki_seq128"]["ppl"]
    assert evaluated == pytest.approx(report["ppl_wiki_after"], rel=1e-4)


def test_smollm2_taylor1_beats_random(smollm2_loaded):
    import copy

    dense, tokenizer = smollm2_loaded
    windows = pool_windows(tokenizer, "wiki", 128, "eval")[:16]
    ppl = {}
    for metric in ("taylor1", "random"):
        model = copy.deepcopy(dense)
        prune_model(model, tokenizer, PruneOptions(PruneSpec(0.25, metric=metric), calib="wiki:8"), progress=False)
        ppl[metric] = perplexity(model, windows, progress=False)
    assert ppl["taylor1"] < ppl["random"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pools", "wiki,atlantis"], "unknown pool 'atlantis'"),
        (["--storage", "nosuchdb:///x"], "cannot open storage"),
        (["--ratio", "1.2"], "outside (0, 1)"),
        (["--metrics", "l2,magic"], "unknown metric 'magic'"),
        (["--allocations", "uniform,magic"], "--allocations: unknown choice 'magic'"),
        (["--compensations", ""], "--compensations: unknown choice ''"),
        (["--no-attention", "--no-mlp"], "leaves nothing to prune"),
        (["--structure", "widths", "--ratio", "0.2"], "pass --target-params"),
        (["--structure", "widths", "--target-params", "0.2", "--sampler", "tpe"], "does not search --structure widths"),
        (["--sampler", "evolution"], "does not search --structure config"),
        (["--structure", "widths", "--target-params", "0.2", "--stages", "64,16"], "must grow"),
        (["--structure", "widths", "--target-params", "0.2", "--survivors", "3"], "one survivor count"),
        (["--structure", "widths", "--target-params", "0.2", "--workers", "2"], "pass --workers 1"),
        (["--structure", "widths", "--target-params", "0.2", "--refit-calib", "none"], "pass --refit-calib"),
    ],
)
def test_search_bad_input(argv, message, capsys, tmp_path):
    code, _, err = run_cli(capsys, "search", *argv, "--out", str(tmp_path / "s"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_smollm2_search_resume_mismatch_and_apply(capsys, tmp_path, smollm2_loaded):
    out, cache_dir = tmp_path / "search", tmp_path / "cache"
    common = [
        "--model",
        "smollm2",
        "--recipe",
        "paper",
        "--pools",
        "wiki,news",
        "--pool-size",
        "2",
        "--metrics",
        "l2,vector,taylor2",
        "--sample-counts",
        "1,2",
        "--blocks-per-pool",
        "2",
        "--val-windows",
        "1",
        "--cache-dtype",
        "float32",
        "--cache-dir",
        str(cache_dir),
        "--out",
        str(out),
    ]
    code, stdout, _ = run_cli(capsys, "search", *common, "--trials", "2")
    assert code == 0 and "best trial" in stdout
    assert {"best.json", "history.png", "study.db", "trials.txt", "search.json"} <= {p.name for p in out.iterdir()}
    import optuna

    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 2
    best = json.loads((out / "best.json").read_text())
    assert best["val_ppl"] == min(t.value for t in study.trials)
    assert all(pool in ("wiki", "news") for pool, _ in best["addresses"])

    code, _, _ = run_cli(capsys, "search", *common, "--trials", "3")  # resume: one more trial, cache reused
    assert (
        code == 0
        and len(optuna.load_study(study_name="adapruner", storage=f"sqlite:///{out / 'study.db'}").trials) == 3
    )
    assert len(list(cache_dir.iterdir())) == 1

    code, _, err = run_cli(capsys, "search", *common, "--trials", "3", "--ratio", "0.3")
    assert code == 2 and "created with ratio=0.25, not 0.3" in err
    resolved = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{out / 'study.db'}").user_attrs["setup"][
        "val_dtype"
    ]
    assert resolved == resolve_val_dtype("auto", torch.device("cpu"))  # the study records what `auto` meant here
    assert (
        optuna.load_study(study_name="adapruner", storage=f"sqlite:///{out / 'study.db'}").user_attrs["setup"][
            "cache_dtype"
        ]
        == "float32"
    )
    code, _, err = run_cli(capsys, "search", *common, "--trials", "3", "--val-dtype", "float16")
    assert code == 2 and f"created with val_dtype={resolved!r}, not 'float16'" in err

    pruned = tmp_path / "pruned"
    best = json.loads((out / "best.json").read_text())
    code, _, _ = run_cli(
        capsys, "prune", "--model", "smollm2", "--from-study", str(out), "--no-eval", "--out", str(pruned)
    )
    assert code == 0
    report = json.loads((pruned / "report.json").read_text())
    assert report["options"]["spec"] == best["spec"]
    assert [list(a) for a in report["calib_addresses"]] == best["addresses"]
    assert report["plan"] == best["plan"] and report["plan_source"] == "study"


def test_smollm2_delivered_model_is_the_scored_one(capsys, tmp_path, smollm2_loaded):
    """A taylor1 search with the default bf16 cache → `prune --from-study`: the saved model scores, the way the trial
    was scored, the best trial's val_ppl, and keeps exactly its plan; --recompute reports how far fp32 statistics
    move it."""
    out = tmp_path / "search"
    code, _, _ = run_cli(
        capsys,
        "search",
        "--model",
        "smollm2",
        "--recipe",
        "paper",
        "--pools",
        "wiki",
        "--pool-size",
        "4",
        "--metrics",
        "taylor1",
        "--aggregations",
        "sum",
        "--sample-counts",
        "2,4",
        "--blocks-per-pool",
        "2",
        "--trials",
        "2",
        "--val-windows",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    )
    assert code == 0
    best = json.loads((out / "best.json").read_text())
    assert (
        best["spec"]["metric"] == "taylor1"
        and json.loads((out / "search.json").read_text())["options"]["cache_dtype"] == "bfloat16"
    )
    assert "1 start-up (random), 1 tpe" in (out / "trials.txt").read_text()  # --trials 2: one start-up trial, then TPE
    code, _, _ = run_cli(
        capsys, "prune", "--model", "smollm2", "--from-study", str(out), "--no-eval", "--out", str(tmp_path / "p")
    )
    assert code == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["plan"] == best["plan"] and report["plan_source"] == "study"
    delivered = AutoModelForCausalLM.from_pretrained(
        tmp_path / "p", trust_remote_code=True, dtype=VAL_DTYPES[best["placement"]["val_dtype"]]
    ).eval()
    val = load_file(str(out / "val.safetensors"))["windows"]
    assert perplexity(delivered, val, best["batch_size"], progress=False) == pytest.approx(best["val_ppl"], rel=1e-4)

    code, stdout, _ = run_cli(
        capsys,
        "prune",
        "--model",
        "smollm2",
        "--from-study",
        str(out),
        "--recompute",
        "--no-eval",
        "--out",
        str(tmp_path / "p2"),
    )
    assert code == 0 and "units differ" in stdout
    recomputed = json.loads((tmp_path / "p2" / "report.json").read_text())
    assert recomputed["plan_source"] == "recomputed"
    assert recomputed["units_differing_from_study"] == PrunePlan.from_dict(recomputed["plan"]).units_differing(
        PrunePlan.from_dict(best["plan"])
    )


def test_reports_of_another_version_are_refused(capsys, tmp_path):
    """best.json and report.json carry their format;
    a file of another one is a one-line error before any model loads."""
    (tmp_path / "report.json").write_text(json.dumps({"format": "adapruner.output.report/0", "eval": {}}))
    code, _, err = run_cli(capsys, "eval", "--model", "smollm2", "--report", str(tmp_path / "report.json"))
    assert code == 2 and "another adapruner version" in err and err.count("\n") == 1
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "best.json").write_text(json.dumps({"model": "smollm2", "ratio": 0.25}))  # format 1: no plan
    code, _, err = run_cli(
        capsys, "prune", "--model", "smollm2", "--from-study", str(tmp_path / "study"), "--out", str(tmp_path / "p")
    )
    assert (
        code == 2 and "another adapruner version" in err and "rerun the search" in err and not (tmp_path / "p").exists()
    )


def test_old_flag_spellings_work_for_one_release_with_a_one_line_note(capsys):
    argv = renamed(["search", "--plan", "--out", "x", "--study", "plan"])
    assert argv == ["search", "--memory-plan", "--out", "x", "--study", "plan"]  # a value is left alone
    assert build_parser().parse_args(argv).memory_plan
    assert build_parser().parse_args(renamed(["prune", "--model", "m", "--out", "o", "--uniform"])).stock_config
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        "note: --plan is now --memory-plan; the old spelling goes in the next release",
        "note: --uniform is now --stock-config; the old spelling goes in the next release",
    ]
