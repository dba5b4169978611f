"""Every saved model directory carries a Hub model card whose header parses and whose table names the
report's figures."""

import json

import yaml

from adapruner.cli import main
from adapruner.output.model_card import EMBEDDED_HUB_ID, hub_id
from tests.helpers import save_tiny_model


def card_parts(path):
    text = (path / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_pruned_directory_card_names_the_report_figures(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    out = tmp_path / "p"
    code = main(
        [
            "prune",
            "--model",
            str(tmp_path / "model"),
            "--layers",
            "all",
            "--target-params",
            "0.1",
            "--metric",
            "l2",
            "--allocation",
            "global",
            "--compensate",
            "bias",
            "--calib",
            "wiki:2",
            "--seq-len",
            "16",
            "--max-eval-windows",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    header, body = card_parts(out)
    report = json.loads((out / "report.json").read_text())
    assert (
        header["library_name"] == "transformers" and "adapruner" in header["tags"] and "base_model" not in header
    )  # a local base
    for figure in (
        f"{report['params_after']:,}",
        f"{report['params_before']:,}",
        f"{100 * report['params_removed_fraction']:.2f}%",
        f"{report['ppl_wiki_before']:.3f} → {report['ppl_wiki_after']:.3f}",
        "l2 / sum",
        "| allocation | global |",
        "| compensation | bias |",
        f"| calibration windows | 2 (wiki:{report['calib_addresses'][0][1]}",
    ):
        assert figure in body, figure
    assert "trust_remote_code=True" in body


def test_hub_ids():
    assert hub_id("smollm2") == EMBEDDED_HUB_ID and hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert hub_id("/models/llama") is None and hub_id("runs/a/b") is None
