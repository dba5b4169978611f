"""`adapruner run`: search → prune → (LoRA) → evaluate dense and pruned → report.md, report.json, plots."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from adapruner.choosing.allocation import count_params
from adapruner.commands.eval import EvalOptions, eval_windows
from adapruner.commands.search import resolved, run_search
from adapruner.cutting.pruning import apply_study_plan
from adapruner.data.calibration import pool_windows
from adapruner.devices import Placement, dtype_name
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.evaluate import perplexity
from adapruner.evaluation.finetune import LoraOptions, finetune, merged
from adapruner.evaluation.speed import measure_speed
from adapruner.evaluation.zeroshot import OFFLINE_TASKS, evaluate_tasks, task_manager
from adapruner.model.cost import macs
from adapruner.model.families import text_config
from adapruner.model.models import cache_root, load_placed
from adapruner.output.report import REPORT_FORMAT, write_json_atomic
from adapruner.output.saving import layer_sizes, save_pruned
from adapruner.scoring.refit_pool import RefitPool
from adapruner.searching.best_trial import BestTrial
from adapruner.searching.search_options import SearchOptions
from adapruner.searching.storage_urls import shown_options
from adapruner.staging import check_out_dir, staged_file


@dataclass
class RunOptions:
    """The one-command pipeline; `search` holds the search's own options (model, ratio, trials, …)."""

    search: SearchOptions
    finetune_steps: int = 0
    finetune_data: str = "wiki"
    tasks: tuple[str, ...] = OFFLINE_TASKS
    task_limit: int | None = EvalOptions.task_limit
    max_eval_windows: int | None = EvalOptions.max_windows
    full_seq_len: int = 1024
    batch_size: int = EvalOptions.batch_size
    speed: bool = False  # prefill/decode tokens/s of every model in the report (adapruner.evaluation.speed)


@dataclass
class Row:
    """One model's measurements (a column group of the papers' tables)."""

    name: str
    params: int
    macs: int
    ppl: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)  # tokens/s by measure

    @property
    def average(self) -> float | None:
        accs = [scores["acc"] for scores in self.tasks.values()]
        return sum(accs) / len(accs) if accs else None


def measure(
    name: str, model: nn.Module, tokenizer, options: RunOptions, windows: dict[str, torch.Tensor], manager
) -> Row:
    row = Row(name, count_params(model), macs(model, options.search.seq_len))
    for label, chosen in windows.items():
        row.ppl[label] = perplexity(model, chosen, options.batch_size, desc=f"{name} {label}")
    if options.tasks:
        row.tasks = evaluate_tasks(
            model,
            tokenizer,
            list(options.tasks),
            cache_root() / "tasks",
            options.batch_size,
            options.task_limit,
            manager,
        )
    if options.speed:
        row.speed = measure_speed(model)
    return row


UNFINISHED = "run.unfinished.json"  # in OUT until the reports are written: the options that started the run


def run_pipeline(options: RunOptions, out: Path) -> dict:
    """Every stage's output goes under `out`, which is new or holds an unfinished run of the same options: what a
    stage finished stays there when a later one fails or is interrupted (`UNFINISHED` marks the folder), and the
    same command resumes from the first stage that did not finish — the search's study (a finished search runs no
    trial), the pruned model, the LoRA-recovered one. The reports appear last."""
    recorded = json.loads(json.dumps(shown_options(asdict(options))))
    if not check_unfinished(out, recorded):
        check_out_dir(out)
    placement = resolved(options.search)[1]
    if placement.dispatch is not None and options.finetune_steps:
        raise AdaPrunerError(
            "LoRA recovery does not train a model spread by --device-map: pass --finetune-steps 0, then "
            "`adapruner finetune` the pruned model on a device that holds it"
        )
    # built once, before the search, so that unknown task names fail now
    manager = task_manager(list(options.tasks), cache_root() / "tasks") if options.tasks else None

    def mark_unfinished() -> None:  # once the model has loaded: a model that cannot load leaves no folder
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / UNFINISHED, recorded)

    report = _run_stages(options, out, placement, manager, mark_unfinished)
    (out / UNFINISHED).unlink()
    return report


def check_unfinished(out: Path, recorded: dict) -> bool:
    """True where `out` holds an unfinished run of these options (resume it); an unfinished run of other options is
    a one-line error."""
    marker = out / UNFINISHED
    if not marker.is_file():
        return False
    try:
        earlier = json.loads(marker.read_text())
    except ValueError:
        raise AdaPrunerError(f"{marker} is damaged: remove {out} and run again") from None
    if isinstance(earlier.get("search"), dict):  # search fields added since that run started hold their defaults
        defaults = json.loads(json.dumps(asdict(SearchOptions())))
        earlier["search"] = {**{k: v for k, v in defaults.items() if k not in earlier["search"]}, **earlier["search"]}
    if earlier != recorded:
        changed = sorted(k for k in recorded if earlier.get(k) != recorded[k])
        raise AdaPrunerError(
            f"{out} holds an unfinished run with other options ({', '.join(changed) or 'format'}): "
            "pass the same flags to resume it, or a new --out"
        )
    return True


def _run_stages(
    options: RunOptions, out: Path, placement: Placement, manager, mark_unfinished: Callable[[], None]
) -> dict:
    stage_seconds: dict[str, float] = {}
    started = time.perf_counter()
    best = run_search(options.search, out / "search", before_writing=mark_unfinished)
    stage_seconds["search"] = time.perf_counter() - started

    dense, tokenizer = load_placed(options.search.model, placement)
    short = options.search.seq_len  # the search's window length, then the long one
    context = getattr(text_config(dense.config), "max_position_embeddings", options.full_seq_len)
    full = min(options.full_seq_len, context)
    windows = {f"ppl@{n}": eval_windows(tokenizer, "wiki", n, options.max_eval_windows) for n in (short, full)}

    started = time.perf_counter()
    rows = [measure("dense", dense, tokenizer, options, windows, manager)]
    stage_seconds["evaluate"] = time.perf_counter() - started
    dense_sizes = layer_sizes(dense)

    started = time.perf_counter()
    pruned = dense  # pruned in place: one copy of the model in memory
    saved_pool = json.loads((out / "search" / "search.json").read_text()).get("refit_pool")
    pool = RefitPool.load(Path(saved_pool)) if saved_pool and Path(saved_pool).is_file() else None
    apply_study_plan(pruned, best, tokenizer, refit_pool=pool)  # the plan the best trial scored, refit as scored
    stage_seconds["prune"] = time.perf_counter() - started
    best_json = asdict(best)
    if not (out / "pruned").is_dir():  # save_pruned stages: a folder there is whole
        save_pruned(pruned, tokenizer, out / "pruned", extra_json={"best.json": best_json})

    started = time.perf_counter()
    rows.append(measure("pruned", pruned, tokenizer, options, windows, manager))
    stage_seconds["evaluate"] += time.perf_counter() - started
    history = None
    if options.finetune_steps and (out / "pruned-lora").is_dir():  # recovered before an interruption: reused
        own = replace(placement, trust_remote_code=False, dispatch=None)  # our own saved model, on one device
        recovered = load_placed(str(out / "pruned-lora"), own)[0]
        history = json.loads((out / "pruned-lora" / "finetune.json").read_text())
    elif options.finetune_steps:
        started = time.perf_counter()
        val = pool_windows(tokenizer, "wiki", short, "val")[: options.search.val_windows]
        result = finetune(
            pruned,
            tokenizer,
            options.finetune_data,
            LoraOptions(
                max_steps=options.finetune_steps,
                eval_every=max(1, options.finetune_steps // 4),
                dtype=dtype_name(placement.dtype),
            ),
            val,
        )
        recovered = merged(result)
        stage_seconds["finetune"] = time.perf_counter() - started
        history = {"val_ppl": result.val_ppl, "stopped": result.stopped}
        extra = {"best.json": best_json, "finetune.json": history}
        save_pruned(recovered, tokenizer, out / "pruned-lora", extra_json=extra)
    if options.finetune_steps:
        started = time.perf_counter()
        rows.append(measure("pruned + LoRA", recovered, tokenizer, options, windows, manager))
        stage_seconds["evaluate"] += time.perf_counter() - started

    report = {
        "format": REPORT_FORMAT,
        "options": json.loads(json.dumps(shown_options(asdict(options)))),
        "best": best_json,
        "stage_seconds": stage_seconds,
        "eval_windows": {label: int(w.shape[0]) for label, w in windows.items()},
        "rows": [asdict(r) | {"average_acc": r.average} for r in rows],
        "finetune": history,
        "layers": {"dense": dense_sizes, "pruned": layer_sizes(pruned)},
    }
    shutil.copy(out / "search" / "history.png", out / "search_history.png")
    plot_layers(report["layers"], out / "layers.png")
    write_json_atomic(out / "report.json", report)
    with staged_file(out / "report.md") as tmp:
        tmp.write_text(report_markdown(report, rows))
    return report


def report_markdown(report: dict, rows: list[Row]) -> str:
    """The papers' table: params, MACs, perplexities, zero-shot accuracies, average, % of dense, stage times."""
    tasks = list(rows[0].tasks)
    ppl_labels = list(rows[0].ppl)
    header = [
        "model",
        "params",
        f"MACs ({report['options']['search']['seq_len']} tok)",
        *ppl_labels,
        *tasks,
        "average acc",
        "% of dense",
    ]
    lines = ["# adapruner report", ""]
    best = report["best"]
    spec = best["spec"]
    budget = (
        f"target {spec['target_params']} of all parameters"
        if spec["target_params"] is not None
        else f"ratio {spec['ratio']}"
    )
    removed = f"{100 * best['removed_fraction']:.1f}% of the parameters removed"
    if best.get("structure") == "widths":
        kl = "" if best.get("val_kl") is None else f"validation KL {best['val_kl']:.4f}, "
        lines.append(
            f"Best structure: per-layer widths searched by the evolution from the {spec['allocation']} allocation, "
            f"units ranked by `{spec['metric']}` and refit ({spec['compensation']}) on {BestTrial(**best).scored_on}, "
            f"{budget} over layers {spec['layers']}: {removed}; {kl}ppl {best['val_ppl']:.3f} (trial {best['trial']})."
        )
    else:
        lines.append(
            f"Best configuration: `{spec['metric']}` / `{spec['aggregation']}` on {BestTrial(**best).scored_on}, "
            f"allocation {spec['allocation']} "
            f"(slope {spec['depth_slope']:.3f}), compensation {spec['compensation']}, {budget} over layers "
            f"{spec['layers']}: {removed}; validation ppl {best['val_ppl']:.3f} (trial {best['trial']})."
        )
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dense_avg = rows[0].average
    for row in rows:
        cells = [
            row.name,
            f"{row.params / 1e6:.2f}M",
            f"{row.macs / 1e9:.2f}G",
            *(f"{row.ppl[p]:.2f}" for p in ppl_labels),
            *(f"{row.tasks[t]['acc'] * 100:.1f}" for t in tasks),
            "-" if row.average is None else f"{row.average * 100:.1f}",
            "-" if row.average is None or not dense_avg else f"{100 * row.average / dense_avg:.1f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    windows = ", ".join(f"{label}: {n} windows" for label, n in report["eval_windows"].items())
    lines += [
        "",
        (
            f"Perplexity on the held-out wiki evaluation articles ({windows}); "
            "accuracies (acc, %) from lm-evaluation-harness."
        ),
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {stage} | {seconds:.1f} |" for stage, seconds in report["stage_seconds"].items()),
        *speed_table(rows),
        "",
        "![search history](search_history.png)",
        "",
        "![kept heads and channels per layer](layers.png)",
        "",
    ]
    return "\n".join(lines)


def speed_table(rows: list[Row]) -> list[str]:
    """Markdown lines: tokens/s of every measured model and its ratio to the dense one (none without --speed)."""
    if not rows[0].speed:
        return []
    dense = rows[0].speed
    lines = ["", "| model | " + " | ".join(dense) + " |", "|---|" + "---:|" * len(dense)]
    for row in rows:
        cells = [f"{row.speed[m]:.1f} ({row.speed[m] / dense[m]:.2f}x)" for m in dense]
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return [
        *lines,
        "",
        "Tokens/s on the run's device (ratio to dense); see `adapruner.evaluation.speed` for what is timed.",
    ]


def plot_layers(layers: dict, path: Path) -> None:
    """Kept query heads, kv heads and MLP channels per layer, dense against pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    index = range(len(layers["dense"]["intermediate_size_per_layer"]))
    for label, style in (("dense", "--"), ("pruned", "-")):
        axes[0].plot(index, layers[label]["num_attention_heads_per_layer"], style, label=f"query heads ({label})")
        axes[0].plot(index, layers[label]["num_key_value_heads_per_layer"], style, label=f"kv heads ({label})")
        axes[1].plot(index, layers[label]["intermediate_size_per_layer"], style, label=f"MLP channels ({label})")
    for ax, title in zip(axes, ("attention heads kept", "MLP channels kept")):
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
