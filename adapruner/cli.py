"""Command line: `adapruner prune …` and `adapruner eval …` call the same functions a library user calls."""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from adapruner.devices import DEVICE_HELP, DTYPE_CHOICES, DTYPE_HELP, Placement, device_arg, device_errors, dtype_name
from adapruner.errors import AdaPrunerError
from adapruner.report import format_table

RATIO_HELP = (
    "fraction of each pruned layer's attention units and MLP channels to remove (LLM-Pruner's meaning: "
    "0.25 on LLaMA-7B layers 4..29 removes about 20%% of all parameters)"
)
TARGET_HELP = "fraction of the whole model's parameters to remove; the ratio is solved for (instead of --ratio)"
LAYERS_HELP = "layers to prune as START:STOP or 'all' (default: keep the first 4/32 and last 2/32 of the layers whole)"


def build_parser() -> argparse.ArgumentParser:
    from adapruner.importance import AGGREGATIONS, METRICS
    from adapruner.zeroshot import OFFLINE_TASKS

    parser = argparse.ArgumentParser(prog="adapruner", description="Sample-aware structured pruning of LLaMA-family models.")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="prune a model and save it (HF-loadable)")
    prune.add_argument("--model", required=True, help="HF model directory, hub id, or 'smollm2' (embedded, offline)")
    budget = prune.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help=RATIO_HELP + " [default 0.25]")
    budget.add_argument("--target-params", type=float, help=TARGET_HELP)
    prune.add_argument("--metric", default="taylor1", choices=METRICS, help="importance metric (DESIGN.md §2)")
    prune.add_argument("--agg", default="sum", choices=AGGREGATIONS, help="aggregation over a group's members")
    prune.add_argument("--calib", default="wiki:16", help="calibration samples as POOL:N[,POOL:N] (pools: wiki, news, plays, or a .txt/.jsonl path)")
    prune.add_argument("--seq-len", type=int, default=128, help="tokens per calibration and evaluation window")
    prune.add_argument("--layers", default=None, help=LAYERS_HELP)
    prune.add_argument("--attn-granularity", default="kv", choices=("kv", "query"), help="remove whole kv groups, or query heads inside every kv group")
    prune.add_argument("--no-attention", action="store_true", help="prune the MLP only")
    prune.add_argument("--no-mlp", action="store_true", help="prune attention only")
    prune.add_argument("--uniform", action="store_true", help="prune every layer alike and save a stock config (no remote code)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--out", required=True, help="new directory for the pruned model and report.json")
    _add_eval_args(prune)
    prune.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity")

    prune.add_argument("--from-study", default=None, help="apply the plan of the best trial of an `adapruner search` output directory (as scored)")
    prune.add_argument("--recompute", action="store_true", help="with --from-study: re-derive the plan from fp32 statistics on the trial's windows and report the units that differ")
    _add_placement_args(prune)

    search = commands.add_parser("search", help="AdaPruner: Bayesian search over calibration samples and metrics")
    _add_search_args(search)
    search.add_argument("--out", required=True, help="directory for the study, best.json and plots (reuse it to resume)")
    _add_placement_args(search)

    run = commands.add_parser("run", help="search → prune → (LoRA) → evaluate dense and pruned → report.md")
    _add_search_args(run)
    run.add_argument("--finetune-steps", type=int, default=0, help="LoRA recovery steps after pruning (0: none)")
    run.add_argument("--finetune-data", default="wiki", help="LoRA training data (see `adapruner finetune --data`)")
    run.add_argument("--tasks", default=",".join(OFFLINE_TASKS), help="zero-shot tasks (comma-separated; empty for none)")
    run.add_argument("--task-limit", type=int, default=None, help="items per task (default: all)")
    run.add_argument("--max-eval-windows", type=int, default=None, help="perplexity windows per length (default: all)")
    run.add_argument("--full-seq-len", type=int, default=1024, help="the long perplexity window (capped at the model's context)")
    run.add_argument("--out", required=True, help="new directory for every stage's output and the report")
    _add_placement_args(run)

    tune = commands.add_parser("finetune", help="recover a pruned model with LoRA (peft), then merge or keep the adapter")
    tune.add_argument("--model", required=True, help="a pruned model directory (or any HF model, or 'smollm2')")
    tune.add_argument("--data", default="wiki", help="wiki (training articles), news, plays, a .txt/.jsonl text file, or Alpaca .json/.jsonl")
    tune.add_argument("--out", required=True, help="new directory for the merged model (or the adapter with --keep-adapter)")
    tune.add_argument("--steps", type=int, default=100, help="optimizer steps (step budget)")
    tune.add_argument("--minutes", type=float, default=None, help="stop after this much training time (time budget)")
    tune.add_argument("--batch-size", type=int, default=4)
    tune.add_argument("--lr", type=float, default=1e-4)
    tune.add_argument("--lora-r", type=int, default=8)
    tune.add_argument("--lora-alpha", type=int, default=16)
    tune.add_argument("--lora-dropout", type=float, default=0.05)
    tune.add_argument("--cutoff", type=int, default=256, help="tokens per training example")
    tune.add_argument("--eval-every", type=int, default=25, help="steps between validation perplexities")
    tune.add_argument("--val-windows", type=int, default=16, help="wiki validation windows per evaluation")
    tune.add_argument("--seq-len", type=int, default=128, help="tokens per validation window")
    _add_placement_args(tune)
    tune.add_argument("--train-on-prompt", action="store_true", help="Alpaca data: also take the loss on the prompt")
    tune.add_argument("--keep-adapter", action="store_true", help="save the adapter in peft's format instead of merging it")
    tune.add_argument("--seed", type=int, default=0)

    evaluate = commands.add_parser("eval", help="measure a model's perplexity")
    evaluate.add_argument("--model", required=True, help="a pruned model directory, an HF model, or 'smollm2'")
    evaluate.add_argument("--ppl", default="wiki", help="text for perplexity: wiki (held-out articles), news, plays, or a path")
    evaluate.add_argument("--report", default=None, help="report.json to update (default: beside a local model)")
    evaluate.add_argument("--tasks", default=None, help="zero-shot tasks through lm-eval, comma-separated: adapruner_cloze, adapruner_lastword, or standard names (boolq, piqa, …) cached offline")
    evaluate.add_argument("--limit", type=int, default=None, help="items per zero-shot task (default: all)")
    evaluate.add_argument("--no-ppl", action="store_true", help="skip perplexity (tasks only)")
    _add_eval_args(evaluate)
    evaluate.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation window")
    _add_placement_args(evaluate)
    return parser


def _add_placement_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)


def _add_search_args(parser: argparse.ArgumentParser) -> None:
    from adapruner.importance import AGGREGATIONS
    from adapruner.search import DEFAULT_METRICS
    from adapruner.validation import VAL_DTYPES

    parser.add_argument("--model", default="smollm2", help="HF model directory, hub id, or 'smollm2'")
    parser.add_argument("--ratio", type=float, default=0.25, help=RATIO_HELP)
    parser.add_argument("--pools", default="wiki,news,plays", help="candidate text pools, comma-separated (built-in names or paths)")
    parser.add_argument("--pool-size", type=int, default=32, help="cached candidate windows per pool")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", default=None, help=LAYERS_HELP)
    parser.add_argument("--attn-granularity", default="kv", choices=("kv", "query"))
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="metrics the search may choose")
    parser.add_argument("--aggregations", default=",".join(AGGREGATIONS), help="aggregations the search may choose")
    parser.add_argument("--sample-counts", default="4,8,16,32", help="calibration sample counts the search may choose")
    parser.add_argument("--blocks-per-pool", type=int, default=4, help="inclusion switches per pool (the subset encoding)")
    parser.add_argument("--depth-slope", type=float, default=0.0, help="also search a per-layer ratio slope in [-S, S] (0: uniform ratio)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--startup-trials", type=int, default=None, help="TPE's random start-up trials (default: a quarter of --trials, at least 1)")
    parser.add_argument("--sampler", default="tpe", choices=("tpe", "random"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-windows", type=int, default=16, help="validation windows per trial (wiki validation articles)")
    parser.add_argument("--val-dtype", default="auto", choices=("auto", *VAL_DTYPES),
                        help="dtype of the trials' validation forward (auto: bf16 where the hardware multiplies it natively, else fp32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the study")
    parser.add_argument("--early-stop", action="store_true", help="prune bad trials early from per-batch validation loss (median rule)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in --out); journal:PATH for a journal file")
    parser.add_argument("--study", default="adapruner", help="study name; an existing one resumes")
    parser.add_argument("--cache-dir", default=None, help="where activation caches live (default ~/.cache/adapruner/activations)")
    parser.add_argument("--cache-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="dtype of the cached X and dY (float32: exact taylor1/mix, twice the size)")
    parser.add_argument("--cache-mem", type=float, default=8.0, help="GiB: a cache up to this size is read into memory, a larger one is memory-mapped")


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-eval-windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"prune": run_prune, "eval": run_eval, "search": run_search_command, "finetune": run_finetune, "run": run_pipeline_command}
        with device_errors():
            return commands[args.command](args)
    except AdaPrunerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_prune(args: argparse.Namespace) -> int:
    from adapruner.calibration import parse_calib_spec
    from adapruner.corpora import check_pool
    from adapruner.evaluate import perplexity
    from adapruner.io import check_out_dir, save_pruned
    from adapruner.models import load_model
    from adapruner.prune import check_ratio, count_params
    from adapruner.kernels.dispatch import kernel_backend
    from adapruner.prune import PrunePlan
    from adapruner.pruner import PruneOptions, apply_study_plan, prune_model

    check_out_dir(args.out)
    placement = Placement.of(args.device, args.dtype)
    for pool, _count in parse_calib_spec(args.calib):
        check_pool(pool)
    if args.ratio is not None:
        check_ratio(args.ratio)
    if args.uniform and args.layers not in (None, "all"):
        raise AdaPrunerError("--uniform prunes every layer alike: drop --layers")
    if args.no_attention and args.no_mlp:
        raise AdaPrunerError("--no-attention with --no-mlp leaves nothing to prune: drop one")
    if args.recompute and not args.from_study:
        raise AdaPrunerError("--recompute re-derives a search's plan: add --from-study DIR")
    if args.uniform and args.from_study and not args.recompute:
        raise AdaPrunerError("--uniform prunes every layer alike, which the study's plan does not: add --recompute or drop --uniform")
    best = read_best_trial(args.from_study, args.model) if args.from_study else None
    if best is not None:
        options = PruneOptions.from_best(best)
        options.layers = "all" if args.uniform else options.layers
    else:
        options = PruneOptions(
            ratio=args.ratio if args.ratio is not None or args.target_params is not None else 0.25,
            target_params=args.target_params,
            metric=args.metric,
            aggregation=args.agg,
            calib=args.calib,
            seq_len=args.seq_len,
            layers="all" if args.uniform else args.layers,
            granularity=args.attn_granularity,
            prune_attention=not args.no_attention,
            prune_mlp=not args.no_mlp,
            seed=args.seed,
        )
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, placement.dtype, placement.device)
    windows = None if args.no_eval else _eval_windows(tokenizer, "wiki", options.seq_len, args.max_eval_windows)
    params_before = count_params(model)
    ppl_before = None if windows is None else perplexity(model, windows, args.batch_size, desc="ppl dense")
    prune_started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        result = apply_study_plan(model, best) if best is not None and not args.recompute else prune_model(model, tokenizer, options)
    prune_seconds = time.perf_counter() - prune_started
    provenance = {}
    if best is not None:
        provenance = {"plan_source": "recomputed" if args.recompute else "study", "study": str(args.from_study), "study_val_ppl": best["val_ppl"]}
        if args.recompute:
            provenance["units_differing_from_study"] = result.plan.units_differing(PrunePlan.from_dict(best["plan"]))
            print(f"recomputed plan vs the study's: {provenance['units_differing_from_study']} units differ")
    params_after = count_params(model)
    ppl_after = None if windows is None else perplexity(model, windows, args.batch_size, desc="ppl pruned")
    report = {
        "model": args.model,
        "options": vars(options),
        "params_before": params_before,
        "params_after": params_after,
        "params_removed_fraction": 1 - params_after / params_before,
        "ppl_wiki_before": ppl_before,
        "ppl_wiki_after": ppl_after,
        "eval_windows": None if windows is None else int(windows.shape[0]),
        "seq_len": options.seq_len,
        "prune_seconds": prune_seconds,
        "total_seconds": time.perf_counter() - started,
        "placement": placement.describe(),
        "backends": {"importance": kernel_backend(placement.device), "gather": kernel_backend(placement.device)},
        **provenance,
        **result.summary(),
    }
    save_pruned(model, tokenizer, args.out, uniform=args.uniform, extra_json={"report.json": report})
    rows = [
        ["params", params_before, params_after],
        ["ppl wiki", _maybe(ppl_before), _maybe(ppl_after)],
        ["time (s)", "", round(report["total_seconds"], 1)],
    ]
    print(format_table(["", "dense", f"pruned ({options.metric}, r={result.ratio:.3f})"], rows))
    print(f"saved to {args.out} (report.json beside the model)")
    return 0


def read_best_trial(study_dir: str, model: str) -> dict:
    """best.json of an `adapruner search` output directory, checked against the model about to be pruned."""
    best_path = Path(study_dir) / "best.json"
    if not best_path.is_file():
        raise AdaPrunerError(f"{best_path} not found: pass the --out directory of a finished `adapruner search`")
    from adapruner.search_job import BEST_FORMAT

    best = json.loads(best_path.read_text())
    if best.get("format") != BEST_FORMAT:
        raise AdaPrunerError(f"{best_path} was written by another adapruner version (format {best.get('format')!r}, this one reads {BEST_FORMAT!r}): rerun the search")
    if model != best["model"]:
        raise AdaPrunerError(f"the study searched model {best['model']!r}, not {model!r}: pass --model {best['model']}")
    return best


def search_options(args: argparse.Namespace):
    from adapruner.search import metric_choices
    from adapruner.search_job import SearchOptions

    return SearchOptions(
        model=args.model, ratio=args.ratio, pools=[p.strip() for p in args.pools.split(",") if p.strip()],
        pool_size=args.pool_size, seq_len=args.seq_len, layers=args.layers, granularity=args.attn_granularity,
        metrics=metric_choices(args.metrics), aggregations=tuple(a.strip() for a in args.aggregations.split(",")),
        sample_counts=_int_list(args.sample_counts, "--sample-counts"), blocks_per_pool=args.blocks_per_pool,
        depth_slope=args.depth_slope, trials=args.trials, startup_trials=args.startup_trials, sampler=args.sampler, seed=args.seed, val_windows=args.val_windows, val_dtype=args.val_dtype,
        batch_size=args.batch_size, workers=args.workers, early_stop=args.early_stop, storage=args.storage,
        study=args.study, cache_dir=args.cache_dir, cache_dtype=args.cache_dtype, cache_mem_gb=args.cache_mem,
        device=args.device, dtype=args.dtype,
    )


def run_search_command(args: argparse.Namespace) -> int:
    from adapruner.search_job import run_search

    best = run_search(search_options(args), Path(args.out))
    print(f"best trial {best['trial']}: {best['metric']}/{best['aggregation']}, {len(best['samples'])} samples, val ppl {best['val_ppl']:.3f}")
    print(f"wrote {args.out}/best.json, history.png; apply with: adapruner prune --model {args.model} --from-study {args.out} --out DIR")
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise AdaPrunerError(f"{flag} {text!r}: write comma-separated integers, e.g. 4,8,16") from None
    if not values or min(values) < 1:
        raise AdaPrunerError(f"{flag} {text!r}: counts must be at least 1")
    return values


def run_pipeline_command(args: argparse.Namespace) -> int:
    from adapruner.pipeline import RunOptions, run_pipeline

    options = RunOptions(
        search=search_options(args), finetune_steps=args.finetune_steps, finetune_data=args.finetune_data,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), task_limit=args.task_limit,
        max_eval_windows=args.max_eval_windows, full_seq_len=args.full_seq_len, batch_size=args.batch_size,
    )
    run_pipeline(options, Path(args.out))
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.md, report.json, layers.png, search_history.png")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from adapruner.calibration import pool_windows
    from adapruner.evaluate import perplexity
    from adapruner.finetune import LoraOptions, finetune, mean_loss, merged
    from adapruner.io import check_out_dir, save_adapter, save_pruned
    from adapruner.models import load_model

    check_out_dir(args.out)
    placement = Placement.of(args.device, args.dtype)
    options = LoraOptions(
        r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, lr=args.lr, cutoff=args.cutoff, batch_size=args.batch_size,
        max_steps=args.steps, max_minutes=args.minutes, eval_every=args.eval_every, train_on_prompt=args.train_on_prompt, dtype=dtype_name(placement.dtype), seed=args.seed,
    )
    model, tokenizer = load_model(args.model, placement.dtype, placement.device)
    val = pool_windows(tokenizer, "wiki", args.seq_len, "val")[: args.val_windows]
    before = perplexity(model, val, desc="val ppl before")
    result = finetune(model, tokenizer, args.data, options, val)
    report = {
        "model": args.model, "data": args.data, "options": vars(options) | {"targets": list(options.targets)},
        "val_ppl_before": before, "val_ppl_history": result.val_ppl, "train_loss": result.losses,
        "stopped": result.stopped, "seconds": result.seconds, "merged": not args.keep_adapter,
    }
    if args.keep_adapter:
        save_adapter(result.model, tokenizer, args.out, {"report.json": report})
    else:
        save_pruned(merged(result), tokenizer, args.out, extra_json={"report.json": report})
    after = result.val_ppl[-1][1] if result.val_ppl else float("nan")
    print(format_table(["", "before", "after"], [["val ppl (wiki)", before, after], ["train loss (last 10)", "", mean_loss(result.losses)]]))
    print(f"{result.stopped}; saved to {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from adapruner.evaluate import perplexity
    from adapruner.models import cache_root, load_model
    from adapruner.prune import count_params
    from adapruner.report import write_json_atomic

    started = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    if args.no_ppl and not tasks:
        raise AdaPrunerError("--no-ppl without --tasks measures nothing: drop --no-ppl or name --tasks")
    placement = Placement.of(args.device, args.dtype)
    model, tokenizer = load_model(args.model, placement.dtype, placement.device)
    results: dict[str, dict] = {}
    if not args.no_ppl:
        windows = _eval_windows(tokenizer, args.ppl, args.seq_len, args.max_eval_windows)
        ppl = perplexity(model, windows, args.batch_size)
        results[f"ppl_{Path(args.ppl).name}_seq{args.seq_len}"] = {"ppl": ppl, "windows": int(windows.shape[0])}
    if tasks:
        from adapruner.zeroshot import evaluate_tasks

        results.update({f"task_{name}": scores for name, scores in evaluate_tasks(model, tokenizer, tasks, cache_root() / "tasks", args.batch_size, args.limit).items()})
    seconds = time.perf_counter() - started
    rows = [[name, ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "windows")] for name, values in results.items()]
    print(f"{args.model}: {count_params(model):,} params, {seconds:.1f} s")
    print(format_table(["measure", "value"], rows))
    report_path = Path(args.report) if args.report else (Path(args.model) / "report.json" if Path(args.model).is_dir() else None)
    if report_path is not None:
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        report.setdefault("eval", {}).update(results)
        write_json_atomic(report_path, report)
        print(f"wrote {report_path}")
    return 0


def _eval_windows(tokenizer, pool: str, seq_len: int, max_windows: int | None):
    from adapruner.calibration import pool_windows

    if max_windows is not None and max_windows < 1:
        raise AdaPrunerError(f"--max-eval-windows {max_windows} must be at least 1")
    windows = pool_windows(tokenizer, pool, seq_len, "eval")
    if windows.shape[0] == 0:
        raise AdaPrunerError(f"pool {pool!r} has no window of {seq_len} tokens: shorten --seq-len")
    return windows[:max_windows] if max_windows else windows


def _maybe(value: float | None) -> object:
    return "-" if value is None else value


if __name__ == "__main__":
    sys.exit(main())
