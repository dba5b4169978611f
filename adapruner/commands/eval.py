"""`adapruner eval` as a library call: perplexity on held-out text and zero-shot tasks, merged into a report.json."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapruner.choosing.allocation import count_params
from adapruner.data.calibration import DEFAULT_SEQ_LEN, pool_windows
from adapruner.data.corpora import read_utf8
from adapruner.devices import Placement, model_device
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.evaluate import perplexity
from adapruner.model.models import cache_root, load_placed
from adapruner.model.structure import check_context
from adapruner.output.report import REPORT_FORMAT, write_json_atomic
from adapruner.staging import check_writable


@dataclass
class EvalOptions:
    """What a model is measured on: perplexity over windows of `ppl` (its evaluation split), and zero-shot `tasks`."""

    ppl: str | None = "wiki"  # None: no perplexity
    seq_len: int = DEFAULT_SEQ_LEN
    max_windows: int | None = None  # None: every window
    batch_size: int = 8
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None  # items per task (None: all)
    speed: bool = False  # prefill and decode tokens/s (adapruner.evaluation.speed)


def eval_windows(tokenizer, pool: str, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """The evaluation windows of `pool` (the held-out split), the first `max_windows` of them."""
    if max_windows is not None and max_windows < 1:
        raise AdaPrunerError(f"--max-eval-windows {max_windows} must be at least 1")
    windows = pool_windows(tokenizer, pool, seq_len, "eval")
    if windows.shape[0] == 0:
        raise AdaPrunerError(f"pool {pool!r} has no window of {seq_len} tokens: shorten --seq-len")
    return windows[:max_windows] if max_windows else windows


def read_report(path: Path) -> dict:
    """A report.json to merge into; anything else is refused in one line before the model loads."""
    try:
        merged = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise AdaPrunerError(f"{path}:{exc.lineno}: not valid JSON: pass --report NEW.json") from None
    if not isinstance(merged, dict):
        raise AdaPrunerError(f"{path} holds no JSON object: pass --report NEW.json")
    return merged


def evaluate_model(model_name: str, options: EvalOptions, placement: Placement, report: Path | None = None) -> dict:
    """{measure: values} for `model_name`; with `report`, the results are merged into that report.json (atomically)."""
    if options.ppl is None and not options.tasks and not options.speed:
        raise AdaPrunerError("--no-ppl without --tasks or --speed measures nothing: drop --no-ppl or name --tasks")
    merged = read_report(report) if report is not None and report.is_file() else {"format": REPORT_FORMAT}
    if report is not None:
        check_writable(report, "--report")
    if merged.get("format") != REPORT_FORMAT:
        raise AdaPrunerError(
            f"{report} was written by another adapruner version (format {merged.get('format')!r}): "
            "pass --report NEW.json"
        )
    started = time.perf_counter()
    model, tokenizer = load_placed(model_name, placement)
    if options.ppl is not None:
        check_context(model, options.seq_len)
    results: dict[str, dict] = {}
    if options.ppl is not None:
        windows = eval_windows(tokenizer, options.ppl, options.seq_len, options.max_windows)
        results[f"ppl_{Path(options.ppl).name}_seq{options.seq_len}"] = {
            "ppl": perplexity(model, windows, options.batch_size),
            "windows": int(windows.shape[0]),
        }
    if options.tasks:
        from adapruner.evaluation.zeroshot import evaluate_tasks

        scores = evaluate_tasks(
            model, tokenizer, list(options.tasks), cache_root() / "tasks", options.batch_size, options.task_limit
        )
        results.update({f"task_{name}": values for name, values in scores.items()})
    if options.speed:
        from adapruner.evaluation.speed import measure_speed

        results["speed"] = {**measure_speed(model), "device": str(model_device(model))}
    if report is not None:
        merged.setdefault("eval", {}).update(results)
        write_json_atomic(report, merged)
    return {"params": count_params(model), "seconds": time.perf_counter() - started, "results": results}
