"""`adapruner prune` as a library call: checks → load → (perplexity) → prune → (perplexity) → save with report.json."""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from adapruner.choosing.allocation import count_params
from adapruner.choosing.allocation_rules import allocation
from adapruner.commands.eval import EvalOptions, eval_windows
from adapruner.cutting.layout_check import check_family_layout
from adapruner.cutting.pruning import PruneOptions, apply_study_plan, prune_model
from adapruner.cutting.working_set import PruneMemoryPlan, prune_memory_plan
from adapruner.data.calibration import parse_calib_spec
from adapruner.data.corpora import check_pool
from adapruner.devices import Placement
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.evaluate import perplexity
from adapruner.kernels.dispatch import kernel_backend
from adapruner.model.families import check_attention_pruning
from adapruner.model.models import load_placed, load_shapes, weights_file_bytes
from adapruner.model.structure import check_context
from adapruner.output.report import REPORT_FORMAT
from adapruner.output.saving import save_pruned
from adapruner.searching.best_trial import BestTrial
from adapruner.searching.front import delivered_at
from adapruner.staging import check_out_dir

DEFAULT_EVAL = EvalOptions()  # perplexity on the held-out wiki windows before and after


def read_best_trial(study_dir: str | Path, model: str, budget: float | None = None) -> BestTrial:
    """best.json of an `adapruner search` output directory — or, given a `budget`, the structure found at it (a
    widths search's front) — checked against the model about to be pruned."""
    best = BestTrial.read(Path(study_dir) / "best.json")
    if model != best.model:
        raise AdaPrunerError(f"the study searched model {best.model!r}, not {model!r}: pass --model {best.model}")
    return best if budget is None else delivered_at(Path(study_dir), best, budget)


def prune_memory_plan_of(
    model_name: str,
    options: PruneOptions,
    placement: Placement,
    study: str | Path | None = None,
    stock_config: bool = False,
) -> PruneMemoryPlan:
    """What `prune_and_save` with these arguments holds beside the weights (`adapruner.cutting.working_set`), from
    the model's config alone; a study's best trial is planned as the recipe it was scored with."""
    if study is not None:
        options = PruneOptions.from_best(read_best_trial(study, model_name, options.spec.target_params))
    if stock_config:  # every layer pruned alike
        options = replace(options, spec=options.spec.with_(layers="all", same_size=True))
    shapes = load_shapes(model_name, placement.dtype, placement.trust_remote_code)
    check_context(shapes, options.seq_len)
    return prune_memory_plan(shapes, options, str(placement.device), weights_file_bytes(model_name) or None)


def prune_and_save(
    model_name: str,
    options: PruneOptions,
    out: str | Path,
    placement: Placement,
    evaluation: EvalOptions | None = DEFAULT_EVAL,
    study: str | Path | None = None,
    recompute: bool = False,
    stock_config: bool = False,
) -> dict:
    """Prune `model_name` as `options` say — or apply the plan a search scored (`study`; `recompute` re-derives it
    from statistics recomputed on the trial's windows and counts the units that differ) — and save it to the new
    directory `out` with report.json. `evaluation` (None, or ppl None: skip) measures perplexity on its `ppl` pool's
    evaluation windows before and after (zero-shot tasks run through `eval_job.evaluate_model`). Returns the report."""
    check_out_dir(out)
    spec = options.spec.check()
    if stock_config and spec.layers not in (None, "all"):
        raise AdaPrunerError("--stock-config prunes every layer alike: drop --layers")
    if stock_config and (allocation(spec.allocation).scored or spec.compensation != "none" or spec.depth_slope):
        raise AdaPrunerError(
            "--stock-config saves one size for every layer without biases: pass --allocation uniform --compensate none "
            "(or --recipe paper) and no --depth-slope, or drop --stock-config"
        )
    if recompute and study is None:
        raise AdaPrunerError("--recompute re-derives a search's plan: add --from-study DIR")
    best = read_best_trial(study, model_name, spec.target_params) if study is not None else None
    if best is not None and best.structure == "widths" and (recompute or stock_config):
        raise AdaPrunerError(
            "a widths search's plan is what it found (per-layer widths), not a rule to re-derive or one size for "
            "every layer: drop --recompute and --stock-config"
        )
    if stock_config and study is not None and not recompute:
        raise AdaPrunerError(
            "--stock-config prunes every layer alike, which the study's plan does not: "
            "add --recompute or drop --stock-config"
        )
    if best is not None:
        options = PruneOptions.from_best(best)
    for pool, _count in parse_calib_spec(options.calib) + parse_calib_spec(options.refit_calib or options.calib):
        check_pool(pool)  # the study's windows too: before the model loads
    if stock_config:
        options = replace(options, spec=options.spec.with_(layers="all", same_size=True))
    if evaluation is not None and evaluation.ppl is None:
        evaluation = None

    shapes = load_shapes(model_name, placement.dtype, placement.trust_remote_code)
    check_attention_pruning(shapes.config, options.spec.prune_attention, options.spec.inexact_heads)
    started = time.perf_counter()
    model, tokenizer = load_placed(model_name, placement)
    check_family_layout(model)
    check_context(model, options.seq_len)
    if evaluation is not None:
        check_context(model, evaluation.seq_len)
    windows = (
        None
        if evaluation is None
        else eval_windows(tokenizer, evaluation.ppl, evaluation.seq_len, evaluation.max_windows)
    )
    params_before = count_params(model)
    ppl_before = None if windows is None else perplexity(model, windows, evaluation.batch_size, desc="ppl dense")
    prune_started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        result = (
            apply_study_plan(model, best, tokenizer)
            if best is not None and not recompute
            else prune_model(model, tokenizer, options)
        )
    prune_seconds = time.perf_counter() - prune_started
    provenance = {}
    if best is not None:
        provenance = {
            "plan_source": "recomputed" if recompute else "study",
            "study": str(study),
            "study_val_ppl": best.val_ppl,
        }
        if recompute:
            provenance["units_differing_from_study"] = result.plan.units_differing(best.prune_plan)
    params_after = count_params(model)
    ppl_after = None if windows is None else perplexity(model, windows, evaluation.batch_size, desc="ppl pruned")
    report = {
        "format": REPORT_FORMAT,
        "model": model_name,
        "options": asdict(options),
        "params_before": params_before,
        "params_after": params_after,
        "params_removed_fraction": 1 - params_after / params_before,
        "ppl_wiki_before": ppl_before,
        "ppl_wiki_after": ppl_after,
        "ppl_text": None if evaluation is None else evaluation.ppl,
        "eval_seq_len": None if evaluation is None else evaluation.seq_len,
        "eval_windows": None if windows is None else int(windows.shape[0]),
        "seq_len": options.seq_len,
        "prune_seconds": prune_seconds,
        "total_seconds": time.perf_counter() - started,
        "placement": placement.describe(),
        "backends": {"importance": kernel_backend(placement.device), "gather": kernel_backend(placement.device)},
        **provenance,
        **result.summary(),
    }
    save_pruned(model, tokenizer, out, stock_config=stock_config, extra_json={"report.json": report})
    return report
