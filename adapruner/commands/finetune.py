"""`adapruner finetune` as a library call: load → validation perplexity → LoRA → save merged (or the adapter)
with report.json."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from adapruner.data.calibration import DEFAULT_SEQ_LEN, pool_windows
from adapruner.devices import Placement, dtype_name
from adapruner.evaluation.evaluate import perplexity
from adapruner.evaluation.finetune import LoraOptions, finetune, mean_loss, merged
from adapruner.model.models import load_placed
from adapruner.model.structure import check_context
from adapruner.output.report import REPORT_FORMAT
from adapruner.output.saving import save_adapter, save_pruned
from adapruner.staging import check_out_dir

VAL_WINDOWS = 16  # wiki validation windows per evaluation


def finetune_and_save(
    model_name: str,
    data: str,
    options: LoraOptions,
    out: str | Path,
    placement: Placement,
    keep_adapter: bool = False,
    val_windows: int = VAL_WINDOWS,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> dict:
    """Recover `model_name` with LoRA on `data` (weights in `placement.dtype` while training), validate on
    `val_windows` wiki validation windows of `seq_len` tokens, save to the new directory `out`. Returns the report."""
    check_out_dir(out)
    options = replace(options, dtype=dtype_name(placement.dtype))
    model, tokenizer = load_placed(model_name, placement)
    check_context(model, seq_len)
    check_context(model, options.cutoff, "--cutoff")
    val = pool_windows(tokenizer, "wiki", seq_len, "val")[:val_windows]
    before = perplexity(model, val, desc="val ppl before")
    result = finetune(model, tokenizer, data, options, val)
    report = {
        "format": REPORT_FORMAT,
        "model": model_name,
        "data": data,
        "options": asdict(options),
        "placement": placement.describe(),
        "val_ppl_before": before,
        "val_ppl_history": result.val_ppl,
        "train_loss": result.losses,
        "train_loss_last10": mean_loss(result.losses),
        "stopped": result.stopped,
        "seconds": result.seconds,
        "merged": not keep_adapter,
    }
    if keep_adapter:
        save_adapter(result.model, tokenizer, out, {"report.json": report})
    else:
        save_pruned(merged(result), tokenizer, out, extra_json={"report.json": report})
    return report
