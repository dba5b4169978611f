"""`adapruner run` end to end on SmolLM2-135M (small settings), and the MACs count."""

import json

from adapruner.cli import main
from adapruner.evaluation.zeroshot import evaluate_tasks
from adapruner.model.cost import macs
from adapruner.model.models import cache_root, load_model


def test_macs_by_hand(mha_model):
    # 3 layers × (q, k, v 48→4·8 and o 32→48, MLP 3 × 48×24) + lm_head 97×48 weights, times 10 tokens;
    # attention: 3 layers × 2 · 4 heads · 8 · 10²
    linear = 3 * (4 * 48 * 32 + 3 * 48 * 24) + 97 * 48
    assert macs(mha_model, 10) == 10 * linear + 3 * 2 * 4 * 8 * 100


def test_run_writes_a_filled_report(tmp_path, capsys, monkeypatch, smollm2_loaded):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--model",
            "smollm2",
            "--recipe",
            "paper",  # the published method's space: ratio 0.25 over whole kv groups
            "--pools",
            "wiki",
            "--pool-size",
            "2",
            "--trials",
            "2",
            "--val-windows",
            "1",
            "--metrics",
            "l2,taylor2",
            "--sample-counts",
            "1,2",
            "--blocks-per-pool",
            "1",
            "--max-eval-windows",
            "2",
            "--full-seq-len",
            "256",
            "--tasks",
            "adapruner_lastword",
            "--task-limit",
            "4",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    dense, pruned = report["rows"]
    assert dense["name"] == "dense" and pruned["params"] < dense["params"] and pruned["macs"] < dense["macs"]
    assert set(dense["ppl"]) == {"ppl@128", "ppl@256"} and pruned["ppl"]["ppl@128"] > dense["ppl"]["ppl@128"]
    saved, tokenizer = load_model(
        str(out / "pruned")
    )  # the report's accuracy is the saved model's, through lm-eval again
    again = evaluate_tasks(saved, tokenizer, ["adapruner_lastword"], cache_root() / "tasks", 8, 4)
    assert pruned["tasks"]["adapruner_lastword"]["acc"] == again["adapruner_lastword"]["acc"]
    assert set(report["stage_seconds"]) == {"search", "prune", "evaluate"}
    markdown = (out / "report.md").read_text()
    assert "| pruned | 111.51M |" in markdown and "% of dense" in markdown
    assert {"layers.png", "search_history.png", "pruned", "search"} <= {p.name for p in out.iterdir()}
    capsys.readouterr()  # the run's progress bars
    assert main(["run", "--tasks"]) == 2  # argparse: missing value, one line
    assert capsys.readouterr().err.startswith("error: argument --tasks: expected one argument")
    assert main(["run", "--tasks", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_run_with_a_structure_search_delivers_the_searched_structure(tmp_path, capsys, smollm2_loaded):
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--model",
            "smollm2",
            "--structure",
            "widths",
            "--target-params",
            "0.1",
            "--refit-calib",
            "wiki:8",
            "--stages",
            "1,2",
            "--survivors",
            "1",
            "--children",
            "2",
            "--trials",
            "2",
            "--max-eval-windows",
            "2",
            "--full-seq-len",
            "256",
            "--tasks",
            "",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    best = json.loads((out / "search" / "best.json").read_text())
    assert best["structure"] == "widths" and best["val_kl"] > 0
    report = json.loads((out / "report.json").read_text())
    dense, pruned = report["rows"]
    assert abs(1 - pruned["params"] / dense["params"] - 0.1) < 0.002  # the budget, biases aside
    saved = json.loads((out / "pruned" / "config.json").read_text())
    plan = best["plan"]
    heads = [len(plan["attention"][str(i)][0]) if str(i) in plan["attention"] else 9 for i in range(30)]
    channels = [len(plan["mlp"][str(i)]) if str(i) in plan["mlp"] else 1536 for i in range(30)]
    assert saved["num_attention_heads_per_layer"] == heads and saved["intermediate_size_per_layer"] == channels
