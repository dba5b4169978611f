"""Command line: parse the flags into the settings objects, call the library function a Python user calls, print.

Every flag's default is read from its settings object (`PruneSpec`, `PruneOptions`, `SearchOptions`, `LoraOptions`,
`EvalOptions`, `RunOptions`), so each default is written once; the argparse types (ranges checked at parse time)
and help texts live here.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from adapruner.choosing.allocation_rules import ALLOCATIONS, names_where
from adapruner.choosing.allocation_rules import help_text as allocation_help_text
from adapruner.choosing.spec import AGGREGATIONS, COMPENSATIONS, GRANULARITIES, PruneSpec
from adapruner.commands.eval import EvalOptions
from adapruner.commands.finetune import VAL_WINDOWS
from adapruner.commands.run import RunOptions
from adapruner.cutting.pruning import PruneOptions
from adapruner.cutting.sequential import check_sequential
from adapruner.data.calibration import DEFAULT_SEQ_LEN, parse_calib_spec
from adapruner.devices import DEVICE_PATTERN, DTYPE_CHOICES, Placement, device_errors
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.finetune import LoraOptions
from adapruner.interrupts import interrupted_by, terminate_as_exit
from adapruner.output.export import OUTTYPES
from adapruner.output.quantize import QUANT_TYPES
from adapruner.output.report import format_table
from adapruner.recipes import DEFAULT_RECIPE, RECIPES, recipe, search_recipe
from adapruner.scoring.metrics import METRIC_NAMES
from adapruner.scoring.metrics import metric as registered
from adapruner.searching.search import STATISTICS
from adapruner.searching.search_options import OBJECTIVES, STRUCTURES, SearchOptions

RATIO_HELP = (
    "fraction of each pruned layer's attention units and MLP channels to remove (LLM-Pruner's meaning: "
    "0.25 on LLaMA-7B layers 4..29 removes about 20%% of all parameters)"
)
TARGET_HELP = (
    "fraction of the whole model's parameters to remove, a budget every allocation meets within one MLP "
    "channel (instead of --ratio)"
)
ALLOCATION_HELP = allocation_help_text()
MIN_KEEP_HELP = (
    f"allocations {', '.join(names_where(lambda a: a.scored))}: each layer keeps at least this fraction of its "
    "attention units and MLP channels (at least one; 0 lets a whole attention or MLP block go)"
)
COMPENSATE_HELP = (
    "after removal, repair o_proj/down_proj outputs from calibration inputs: bias adds the removed channels' mean "
    "contribution; lsq refits the kept columns by damped least squares"
)
DAMP_HELP = "lsq compensation: damping toward the trained weights, times the mean input variance"
OBS_DAMP_HELP = "metric obs: the damping its greedy selection assumes, times the mean input variance"
SEQUENTIAL_HELP = (
    "prune layer by layer, each layer's statistics from the outputs of the pruned and refit layers before it "
    "(metrics obs, act, fluct and the weight metrics)"
)
INEXACT_HEADS_HELP = (
    "prune the heads of a family whose q/k norms span all heads (OLMo-2, OLMo-3, OLMoE): the kept heads are then "
    "renormalised, so a removed head is not the same as a zeroed one (refused without this flag)"
)
ALIGN_HELP = (
    "keep every pruned layer's MLP width a multiple of N channels (of each expert in a MoE layer): hardware-friendly "
    "matmul shapes; budgets are met within one block of N"
)
DEVICE_HELP = "where the model runs: auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
DTYPE_HELP = "model weight dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16"
DEVICE_MAP_HELP = (
    "spread the model over devices with accelerate: auto, balanced, balanced_low_0, sequential, or a JSON file "
    "{module name: device | 'cpu' | 'disk'}; with --max-memory and --offload-dir"
)
MAX_MEMORY_HELP = "with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB (GPU index or cpu = size)"
OFFLOAD_HELP = "with --device-map: folder for the weights the map puts on disk"
REFIT_CALIB_HELP = (
    "lsq/bias compensation refits on these windows (POOL:N[,POOL:N], seeded) instead of the --calib ones: "
    "hundreds of windows refit far better than the few that score well"
)
LAYERS_HELP = (
    "layers to prune as START:STOP or 'all' (recipes paper, llm-pruner and flap keep the first 4/32 and the last "
    "2/32 of the layers whole)"
)
SEARCHABLE = tuple(name for name, r in RECIPES.items() if r.search is not None)  # the recipes search and run take
WHY = {  # one line per default of the best recipe: the bench.quality rows it came from (docs/results.md, "Defaults")
    "metric": "with uniform, fluct/256 beat obs/256 at both budgets (51.96 vs 52.41, 42.03 vs 42.20) and costs less",
    "aggregation": "fluct scores one member per unit (the output columns): nothing to aggregate",
    "calib": "256 windows: the refit and the scores improve with data (fluct/uniform/lsq 58.36 on 32 windows)",
    "granularity": "a SmolLM2 kv group is a third of its attention: query heads cut finer (all rows but LLM-Pruner's)",
    "allocation": "loss beat uniform at both budgets (fluct/256, every layer: 50.19 vs 51.96 at 20%, 39.54 vs 42.03)",
    "layers": "with the loss allocation, every layer beat LLM-Pruner's range (50.19 vs 50.68 at 20%, 39.54 vs 39.85)",
    "compensation": "lsq beat bias and none in every row (fluct/uniform at 20%: 58.36, 71.35, 91.88)",
    "damp": "with 256 windows 0.3 refits better than 1 (docs/results.md, Beyond the published methods)",
    "metrics": "act and fluct give the best rows; obs never beat them, gradient metrics never won a compensated row",
    "allocations": "loss is the best fixed allocation at both budgets; uniform and global won earlier searches",
    "compensations": "lsq won every row",
    "aggregations": "prod and first never won a compensated search",
    "sample_counts": "with --statistics subset: lsq and the moment metrics want windows, 4 never won",
    "statistics": "the 256-window pool scores better than any 32-window subset (fluct 51.96 vs 54.38 at 20%)",
    "refit_calib": "a trial refit on 256 windows instead of its subset: ~10% lower perplexity at 20%",
}
PRUNE, SEARCH, LORA, EVAL = PruneOptions(), SearchOptions(), LoraOptions(), EvalOptions()
SPEC = PRUNE.spec


def by_recipe(text: str, field: str, search: bool = False) -> str:
    """A flag's help with the best recipe's value for it and why that is the default."""
    best = RECIPES[DEFAULT_RECIPE]
    value = (best.search if search else best.prune)[field]
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return f"{text} [default: {shown} from --recipe; {WHY[field]}]".replace("%", "%%")  # argparse formats with %


def recipe_help(names: tuple[str, ...]) -> str:
    """--recipe's help: what each of the recipes `names` is."""
    return "; ".join(f"{name}: {RECIPES[name].about}" for name in names) + " (flags override it)"


def apply_recipe(args: argparse.Namespace) -> None:
    """Fill every recipe-controlled flag the command line left out (None) from `--recipe`: a recipe names fields, and
    the flag of each is the one `SPEC_FLAGS`/`PRUNE_FLAGS` give it (else the flag of the field's own name)."""
    if args.command == "prune":
        values = recipe(args.recipe).prune
    elif args.command in ("search", "run"):
        values = dict(search_recipe(args.recipe))
        refit_calib = values.pop("refit_calib")
        if not hasattr(args, "refit_calib"):  # not given (`none` gives None)
            args.refit_calib = refit_calib
        elif args.refit_calib is None and args.statistics is None:  # `--refit-calib none`: no pool to score on
            args.statistics = "subset"
    else:
        return
    dests = {field: dest_of(flag) for flag, field in (SPEC_FLAGS | PRUNE_FLAGS).items()}
    for field, value in values.items():
        dest = dests.get(field, field)
        if getattr(args, dest, ...) is None:
            setattr(args, dest, ",".join(map(str, value)) if isinstance(value, tuple) else value)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error shape: one line `error: …` on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def at_least(low: float, kind=int):
    """argparse type: a `kind` number ≥ `low`, refused at parse time with the bound in the message."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below its minimum {low}")
        return value

    return parse


def within(low: float, high: float, closed_low: bool = False):
    """argparse type: a float in (low, high), or [low, high) with `closed_low`."""

    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low <= value if closed_low else low < value) or not value < high:
            raise argparse.ArgumentTypeError(f"{value} is outside {'[' if closed_low else '('}{low:g}, {high:g})")
        return value

    return parse


def calib_arg(text: str) -> str:
    """A calibration spec POOL:N[,POOL:N] (checked at parse time; the pools are read before the model loads)."""
    _as_argument_error(parse_calib_spec, text)
    return text


def refit_arg(text: str) -> str | None:
    """--refit-calib: a calibration spec, or `none` (no refit pool)."""
    return None if text == "none" else calib_arg(text)


def study_name(text: str) -> str:
    """argparse type: a study name that is also a safe folder name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a study name: use up to 100 letters, digits, '.', '_' or '-'"
        )
    return text


def within_ports(text: str) -> int:
    """argparse type: a TCP port 1..65535."""
    port = at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1 to 65535")
    return port


COUNT, NONNEGATIVE, WINDOW = at_least(1), at_least(0), at_least(2)  # counts, budgets that may be 0, tokens per window
FRACTION, POSITIVE = within(0, 1), at_least(1e-12, float)


def device_arg(text: str) -> str:
    """argparse type for --device: the spelling is checked at parse time, availability when resolved."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    return text


def device_map_arg(text: str) -> str:
    """argparse type for --device-map: a strategy name, or a JSON file mapping module names to devices."""
    from adapruner.model.big_model import STRATEGIES, read_device_map

    if text not in STRATEGIES:
        _as_argument_error(read_device_map, text)
    return text


def max_memory_arg(text: str) -> str:
    """argparse type for --max-memory: the text, once `parse_max_memory` reads it."""
    from adapruner.model.big_model import parse_max_memory

    _as_argument_error(parse_max_memory, text)
    return text


def _as_argument_error(check, text: str) -> None:
    try:
        check(text)
    except AdaPrunerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_default(name: str):
    """A `RunOptions` field's default (RunOptions needs its search options, so it has no bare instance)."""
    spec = next(f for f in fields(RunOptions) if f.name == name)
    return spec.default if spec.default is not MISSING else spec.default_factory()


def build_parser() -> argparse.ArgumentParser:

    parser = Parser(prog="adapruner", description="Sample-aware structured pruning of LLaMA-family models.")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="prune a model and save it (HF-loadable)")
    prune.add_argument("--model", required=True, help="HF model directory, hub id, or 'smollm2' (embedded, offline)")
    prune.add_argument("--recipe", default=DEFAULT_RECIPE, choices=tuple(RECIPES), help=recipe_help(tuple(RECIPES)))
    _add_spec_args(prune, search=False)
    prune.add_argument(
        "--metric", choices=METRIC_NAMES, help=by_recipe("importance metric (docs/metrics.md)", "metric")
    )
    prune.add_argument(
        "--agg", choices=AGGREGATIONS, help=by_recipe("aggregation over a group's members", "aggregation")
    )
    prune.add_argument(
        "--calib",
        type=calib_arg,
        help=by_recipe("calibration samples as POOL:N[,POOL:N] (wiki, news, plays, or a .txt/.jsonl path)", "calib"),
    )
    prune.add_argument("--refit-calib", type=refit_arg, default=PRUNE.refit_calib, help=REFIT_CALIB_HELP)
    prune.add_argument(
        "--seq-len", type=WINDOW, default=PRUNE.seq_len, help="tokens per calibration and evaluation window"
    )
    prune.add_argument("--allocation", choices=ALLOCATIONS, help=by_recipe(ALLOCATION_HELP, "allocation"))
    prune.add_argument(
        "--depth-slope",
        type=within(0, 1, closed_low=True),
        default=SPEC.depth_slope,
        help="allocation depth: per-layer ratios r·(1 + S·(2p − 1))",
    )
    prune.add_argument("--compensate", choices=COMPENSATIONS, help=by_recipe(COMPENSATE_HELP, "compensation"))
    prune.add_argument(
        "--stock-config",
        action="store_true",
        help="prune every layer alike and save a stock config (no remote code; was --uniform)",
    )
    prune.add_argument("--seed", type=NONNEGATIVE, default=PRUNE.seed)
    prune.add_argument("--out", required=True, help="new directory for the pruned model and report.json")
    prune.add_argument(
        "--max-eval-windows",
        type=COUNT,
        default=EVAL.max_windows,
        help="evaluate only the first N windows (default: all)",
    )
    prune.add_argument("--batch-size", type=COUNT, default=EVAL.batch_size, help="windows per forward pass")
    prune.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity")
    prune.add_argument(
        "--from-study",
        default=None,
        help="apply the plan of the best trial of an `adapruner search` output directory (as scored); with "
        "--target-params p, the structure a widths search's --front found at p",
    )
    prune.add_argument(
        "--recompute",
        action="store_true",
        help=(
            "with --from-study: re-derive the plan from statistics recomputed on the trial's windows and "
            "report the units that differ"
        ),
    )
    prune.add_argument(
        "--memory-plan",
        action="store_true",
        help="print what pruning holds beside the weights, phase by phase, and its peak; then exit (reads no weights)",
    )
    _add_placement_args(prune)
    _add_dispatch_args(prune)

    search = commands.add_parser("search", help="AdaPruner: Bayesian search over calibration samples and metrics")
    _add_search_args(search)
    search.add_argument(
        "--out", required=True, help="directory for the study, best.json and plots (reuse it to resume)"
    )
    search.add_argument(
        "--memory-plan",
        action="store_true",
        help="print the memory plan (model, cache sizes and where they go) and exit; reads no weights",
    )
    _add_placement_args(search)
    _add_dispatch_args(search)

    run = commands.add_parser("run", help="search → prune → (LoRA) → evaluate dense and pruned → report.md")
    _add_search_args(run)
    run.add_argument(
        "--finetune-steps",
        type=NONNEGATIVE,
        default=run_default("finetune_steps"),
        help="LoRA recovery steps after pruning (0: none)",
    )
    run.add_argument(
        "--finetune-data",
        default=run_default("finetune_data"),
        help="LoRA training data (see `adapruner finetune --data`)",
    )
    run.add_argument(
        "--tasks", default=",".join(run_default("tasks")), help="zero-shot tasks (comma-separated; empty for none)"
    )
    run.add_argument(
        "--task-limit", type=COUNT, default=run_default("task_limit"), help="items per task (default: all)"
    )
    run.add_argument(
        "--max-eval-windows",
        type=COUNT,
        default=run_default("max_eval_windows"),
        help="perplexity windows per length (default: all)",
    )
    run.add_argument(
        "--full-seq-len",
        type=WINDOW,
        default=run_default("full_seq_len"),
        help="the long perplexity window (capped at the model's context)",
    )
    run.add_argument(
        "--speed", action="store_true", help="add the prefill and decode tokens/s of every model to the report"
    )
    run.add_argument(
        "--out",
        required=True,
        help="new directory for every stage's output and the report (or an unfinished run's, to resume it)",
    )
    _add_placement_args(run)
    _add_dispatch_args(run)

    tune = commands.add_parser(
        "finetune", help="recover a pruned model with LoRA (peft), then merge or keep the adapter"
    )
    tune.add_argument("--model", required=True, help="a pruned model directory (or any HF model, or 'smollm2')")
    tune.add_argument(
        "--data",
        default="wiki",
        help="wiki (training articles), news, plays, a .txt/.jsonl text file, or Alpaca .json/.jsonl",
    )
    tune.add_argument(
        "--out", required=True, help="new directory for the merged model (or the adapter with --keep-adapter)"
    )
    tune.add_argument("--steps", type=COUNT, default=LORA.max_steps, help="optimizer steps (step budget)")
    tune.add_argument(
        "--minutes", type=POSITIVE, default=LORA.max_minutes, help="stop after this much training time (time budget)"
    )
    tune.add_argument("--batch-size", type=COUNT, default=LORA.batch_size)
    tune.add_argument("--lr", type=POSITIVE, default=LORA.lr)
    tune.add_argument("--lora-r", type=COUNT, default=LORA.r)
    tune.add_argument("--lora-alpha", type=COUNT, default=LORA.alpha)
    tune.add_argument("--lora-dropout", type=within(0, 1, closed_low=True), default=LORA.dropout)
    tune.add_argument("--cutoff", type=WINDOW, default=LORA.cutoff, help="tokens per training example")
    tune.add_argument("--eval-every", type=COUNT, default=LORA.eval_every, help="steps between validation perplexities")
    tune.add_argument("--val-windows", type=COUNT, default=VAL_WINDOWS, help="wiki validation windows per evaluation")
    tune.add_argument("--seq-len", type=WINDOW, default=EVAL.seq_len, help="tokens per validation window")
    tune.add_argument("--train-on-prompt", action="store_true", help="Alpaca data: also take the loss on the prompt")
    tune.add_argument(
        "--keep-adapter", action="store_true", help="save the adapter in peft's format instead of merging it"
    )
    tune.add_argument("--seed", type=NONNEGATIVE, default=LORA.seed)
    _add_placement_args(tune)

    dashboard = commands.add_parser("dashboard", help="optuna-dashboard on a search's study, on 127.0.0.1")
    dashboard.add_argument("out", help="the --out directory of an `adapruner search`")
    dashboard.add_argument("--port", type=within_ports, default=8080, help="port on 127.0.0.1")
    dashboard.add_argument(
        "--storage", default=None, help="the search's storage URL (default: its search.json's, which has no password)"
    )

    export = commands.add_parser("export", help="write a (pruned) model as a GGUF file for llama.cpp")
    export.add_argument("model", help="a pruned model directory, an HF model directory or hub id, or 'smollm2'")
    export.add_argument(
        "--gguf", required=True, help="the new .gguf file (per-layer widths go out as llama.cpp's deci)"
    )
    export.add_argument(
        "--outtype",
        default="f32",
        choices=(*OUTTYPES, *QUANT_TYPES),
        help="tensor type of the 2-D weights (norms stay f32); q4_k_m, q5_k_m, q6_k, … quantize with llama.cpp's "
        "own quantizer (llama-cpp-python) and report the tensors whose widths fall back from K-quants",
    )
    export.add_argument(
        "--imatrix",
        default=None,
        help="with a quantized --outtype: weigh the rounding by the mean squared inputs of these calibration windows "
        "(POOL:N[,POOL:N], e.g. wiki:32), as llama.cpp's imatrix does",
    )
    export.add_argument("--seq-len", type=WINDOW, default=DEFAULT_SEQ_LEN, help="tokens per --imatrix window")
    export.add_argument(
        "--trust-remote-code", action="store_true", help="run Python code shipped with the model (its modeling_*.py)"
    )

    evaluate = commands.add_parser("eval", help="measure a model's perplexity and zero-shot accuracy")
    evaluate.add_argument("--model", required=True, help="a pruned model directory, an HF model, or 'smollm2'")
    evaluate.add_argument(
        "--ppl", default=EVAL.ppl, help="text for perplexity: wiki (held-out articles), news, plays, or a path"
    )
    evaluate.add_argument("--report", default=None, help="report.json to update (default: beside a local model)")
    evaluate.add_argument(
        "--tasks",
        default=",".join(EVAL.tasks),
        help=(
            "zero-shot tasks through lm-eval, comma-separated: adapruner_cloze, adapruner_lastword, or "
            "standard names (boolq, piqa, …) cached offline"
        ),
    )
    evaluate.add_argument(
        "--limit", type=COUNT, default=EVAL.task_limit, help="items per zero-shot task (default: all)"
    )
    evaluate.add_argument("--no-ppl", action="store_true", help="skip perplexity (tasks only)")
    evaluate.add_argument(
        "--speed",
        action="store_true",
        help="measure prefill tokens/s (batch 1 and 8, 512 tokens) and decode tokens/s (batch 1, 128 new tokens)",
    )
    evaluate.add_argument(
        "--max-eval-windows",
        type=COUNT,
        default=EVAL.max_windows,
        help="evaluate only the first N windows (default: all)",
    )
    evaluate.add_argument("--batch-size", type=COUNT, default=EVAL.batch_size, help="windows per forward pass")
    evaluate.add_argument("--seq-len", type=WINDOW, default=EVAL.seq_len, help="tokens per evaluation window")
    _add_placement_args(evaluate)
    _add_dispatch_args(evaluate)
    return parser


def _add_placement_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_arg, default=SEARCH.device, help=DEVICE_HELP)
    parser.add_argument("--dtype", default=SEARCH.dtype, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help=(
            "run Python code shipped with the model (its modeling_*.py); adapruner's own pruned models load without it"
        ),
    )


def _add_dispatch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", type=device_map_arg, default=None, help=DEVICE_MAP_HELP)
    parser.add_argument("--max-memory", type=max_memory_arg, default=None, help=MAX_MEMORY_HELP)
    parser.add_argument("--offload-dir", default=None, help=OFFLOAD_HELP)


def _add_spec_args(parser: argparse.ArgumentParser, search: bool) -> None:
    """The `SPEC_FLAGS` prune, search and run share, declared once (`search`: the recipe's search defaults)."""
    budget = parser.add_mutually_exclusive_group()
    # a study's spec keeps the default ratio beside --target-params (its set-up, compared on resume); a prune's does not
    ratio_default = SPEC.ratio if search else None
    budget.add_argument("--ratio", type=FRACTION, default=ratio_default, help=f"{RATIO_HELP} [default {SPEC.ratio}]")
    budget.add_argument(
        "--target-params", type=FRACTION, help=TARGET_HELP + ("; every trial removes the same count" if search else "")
    )
    parser.add_argument("--layers", help=by_recipe(LAYERS_HELP, "layers", search))
    parser.add_argument(
        "--attn-granularity",
        choices=GRANULARITIES,
        help=by_recipe("remove whole kv groups, or query heads inside every kv group", "granularity", search),
    )
    parser.add_argument("--no-attention", action="store_true", help="prune the MLP only")
    parser.add_argument("--no-mlp", action="store_true", help="prune attention only")
    parser.add_argument("--inexact-heads", action="store_true", help=INEXACT_HEADS_HELP)
    parser.add_argument("--min-keep", type=within(0, 1, closed_low=True), default=SPEC.min_keep, help=MIN_KEEP_HELP)
    parser.add_argument("--damp", type=POSITIVE, help=by_recipe(DAMP_HELP, "damp", search))
    parser.add_argument("--obs-damp", type=POSITIVE, default=SPEC.obs_damp, help=OBS_DAMP_HELP)
    sequential_help = "; trials score from the cache as ever, the best one is re-applied layer by layer"
    parser.add_argument("--sequential", action="store_true", help=SEQUENTIAL_HELP + (sequential_help if search else ""))
    parser.add_argument("--align", type=COUNT, default=SPEC.align, help=ALIGN_HELP)


def _add_search_args(parser: argparse.ArgumentParser) -> None:
    from adapruner.searching.trial_scorer import VAL_DTYPES

    s = SEARCH
    parser.add_argument("--model", default=s.model, help="HF model directory, hub id, or 'smollm2'")
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        choices=SEARCHABLE,
        help=recipe_help(SEARCHABLE),
    )
    _add_spec_args(parser, search=True)
    parser.add_argument(
        "--pools", default=",".join(s.pools), help="candidate text pools, comma-separated (built-in names or paths)"
    )
    parser.add_argument("--pool-size", type=COUNT, default=s.pool_size, help="cached candidate windows per pool")
    parser.add_argument("--seq-len", type=WINDOW, default=s.seq_len)
    parser.add_argument(
        "--allocations",
        help=by_recipe(f"allocations the search may choose ({', '.join(ALLOCATIONS)})", "allocations", search=True),
    )
    parser.add_argument(
        "--compensations",
        help=by_recipe(f"compensations the search may choose ({', '.join(COMPENSATIONS)})", "compensations", True),
    )
    parser.add_argument("--metrics", help=by_recipe("metrics the search may choose", "metrics", search=True))
    parser.add_argument(
        "--refit-calib",
        type=refit_arg,
        default=argparse.SUPPRESS,
        help=by_recipe(
            "the refit pool: windows (POOL:N[,POOL:N], seeded; none: no pool) every compensated trial refits on, "
            "and that --statistics refit scores act/fluct/obs on (one forward pass, saved beside the cache)",
            "refit_calib",
            search=True,
        ),
    )
    parser.add_argument(
        "--statistics",
        help=by_recipe(
            "where trials of act, fluct and obs take their statistics: subset (a sample subset of the cached "
            "pool), refit (the whole refit pool), or both for the search to choose; gradient metrics score subsets",
            "statistics",
            search=True,
        ),
    )
    parser.add_argument(
        "--aggregations", help=by_recipe("aggregations the search may choose", "aggregations", search=True)
    )
    parser.add_argument(
        "--sample-counts",
        help=by_recipe("calibration sample counts the search may choose", "sample_counts", search=True),
    )
    parser.add_argument(
        "--blocks-per-pool",
        type=COUNT,
        default=s.blocks_per_pool,
        help="inclusion switches per pool (the subset encoding)",
    )
    parser.add_argument(
        "--depth-slope",
        type=within(0, 1, closed_low=True),
        default=s.depth_slope,
        help="depth allocation trials draw a per-layer ratio slope in [-S, S]",
    )
    parser.add_argument("--trials", type=COUNT, default=s.trials)
    parser.add_argument(
        "--startup-trials",
        type=NONNEGATIVE,
        default=s.startup_trials,
        help="TPE's random start-up trials (default: a quarter of --trials, at least 1)",
    )
    parser.add_argument(
        "--sampler",
        default=None,
        choices=("tpe", "random", "evolution"),
        help="config search: tpe (default) or random; --structure widths: evolution",
    )
    parser.add_argument(
        "--structure",
        default=s.structure,
        choices=STRUCTURES,
        help="what trials choose: config (metric, samples, allocation) or widths (every layer's attention and MLP "
        "widths, 0 = the block removed, by an evolution from the loss allocation; needs --target-params)",
    )
    parser.add_argument(
        "--objective",
        default=s.objective,
        choices=OBJECTIVES,
        help="--structure widths: what a structure minimises, KL from the dense model or (log) perplexity",
    )
    parser.add_argument(
        "--children", type=COUNT, default=s.children, help="--structure widths: children per generation"
    )
    parser.add_argument(
        "--front",
        default=None,
        help="--structure widths: budgets to search, one evolution each (e.g. 0.2,0.35,0.5) → front.json, front.png; "
        "best.json (and run) deliver --target-params (default: the last), prune --from-study --target-params p any",
    )
    parser.add_argument(
        "--stages",
        default=",".join(map(str, s.stages)),
        help="--structure widths: cumulative validation windows of the selection stages (the last: all it scores on)",
    )
    parser.add_argument(
        "--survivors",
        default=",".join(map(str, s.survivors)),
        help="--structure widths: children kept after each stage but the last",
    )
    parser.add_argument("--seed", type=NONNEGATIVE, default=s.seed)
    parser.add_argument(
        "--val-windows",
        type=COUNT,
        default=s.val_windows,
        help="validation windows per trial (wiki validation articles, or --val-data)",
    )
    parser.add_argument(
        "--val-data",
        default=s.val_data,
        help=(
            "score trials on your own text (a .txt/.jsonl file or a saved dataset, read as --pools reads it) instead "
            "of the wiki validation articles; where it is also a pool, on windows the pool did not draw"
        ),
    )
    parser.add_argument(
        "--val-dtype",
        default=s.val_dtype,
        choices=("auto", *VAL_DTYPES),
        help=(
            "dtype of the trials' validation forward (auto: bf16 where the hardware multiplies it natively, else fp32)"
        ),
    )
    parser.add_argument("--batch-size", type=COUNT, default=s.batch_size)
    parser.add_argument("--workers", type=COUNT, default=s.workers, help="worker processes sharing the study")
    parser.add_argument(
        "--early-stop", action="store_true", help="prune bad trials early from per-batch validation loss (median rule)"
    )
    parser.add_argument(
        "--storage",
        default=s.storage,
        help="Optuna storage URL (default: sqlite in --out); journal:PATH for a journal file",
    )
    parser.add_argument(
        "--study",
        type=study_name,
        default=s.study,
        help="study name (letters, digits, . _ -); an existing one resumes; "
        "a second study in one --out keeps its files under OUT/studies/NAME",
    )
    parser.add_argument(
        "--cache-dir", default=s.cache_dir, help="where activation caches live (default ~/.cache/adapruner/activations)"
    )
    parser.add_argument(
        "--cache-dtype",
        default=s.cache_dtype,
        choices=("bfloat16", "float32"),
        help="dtype of the cached X and dY (float32: exact taylor1/mix, twice the size)",
    )
    parser.add_argument(
        "--cache-mem",
        type=at_least(0, float),
        default=s.cache_mem_gb,
        help="GiB: a cache up to this size is read onto the device, a larger one is memory-mapped",
    )


RENAMED_FLAGS = {  # old spelling → new, accepted until the next release with a one-line note
    "--plan": "--memory-plan",  # search: the memory plan, not a pruning plan
    "--uniform": "--stock-config",  # prune: the stock-config save, not the uniform allocation
}


def renamed(argv: list[str]) -> list[str]:
    """`argv` with every old flag spelling (`RENAMED_FLAGS`) replaced by its new one, each noted on stderr."""
    new = []
    for token in argv:
        old = token.split("=", 1)[0]
        if old in RENAMED_FLAGS:
            print(
                f"note: {old} is now {RENAMED_FLAGS[old]}; the old spelling goes in the next release", file=sys.stderr
            )
            token = RENAMED_FLAGS[old] + token[len(old) :]
        new.append(token)
    return new


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(renamed(sys.argv[1:] if argv is None else argv))
    except SystemExit as exited:  # a refused flag (one line already printed), or --help
        return exited.code if isinstance(exited.code, int) else 2
    apply_recipe(args)
    terminate_as_exit()  # SIGTERM unwinds like SIGINT: staging folders are removed on the way out
    try:
        commands = {
            "prune": run_prune,
            "eval": run_eval,
            "export": run_export,
            "search": run_search_command,
            "finetune": run_finetune,
            "run": run_pipeline_command,
            "dashboard": run_dashboard,
        }
        with device_errors():
            return commands[args.command](args)
    except AdaPrunerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception:
        if interrupted_by() is None:
            raise
        print(INTERRUPTED, file=sys.stderr)  # a library turned the interruption into another error on the way out
        return 128 + interrupted_by()


INTERRUPTED = (
    "error: interrupted: no partial output was left (`search` and `run` resume what they finished with the same "
    "command)"
)


def placement_of(args: argparse.Namespace) -> Placement:
    from adapruner.model.big_model import Dispatch

    dispatch = Dispatch.of(
        getattr(args, "device_map", None), getattr(args, "max_memory", None), getattr(args, "offload_dir", None)
    )
    return Placement.of(args.device, args.dtype, args.trust_remote_code, dispatch)


SPEC_FLAGS = {  # flag → the PruneSpec field it sets in prune, search and run (declared once: `_add_spec_args`)
    "--ratio": "ratio",
    "--target-params": "target_params",
    "--layers": "layers",
    "--attn-granularity": "granularity",
    "--no-attention": "prune_attention",  # a --no-… flag sets its field to False
    "--no-mlp": "prune_mlp",
    "--inexact-heads": "inexact_heads",
    "--min-keep": "min_keep",
    "--damp": "damp",
    "--obs-damp": "obs_damp",
    "--sequential": "sequential",
    "--align": "align",
}
PRUNE_FLAGS = {  # flag → the field of PruneSpec (a search trial's choices) or PruneOptions it sets in prune alone
    "--metric": "metric",
    "--agg": "aggregation",
    "--allocation": "allocation",
    "--depth-slope": "depth_slope",
    "--compensate": "compensation",
    "--calib": "calib",
    "--refit-calib": "refit_calib",
    "--seq-len": "seq_len",
    "--seed": "seed",
}
SPEC_FIELDS = {f.name for f in fields(PruneSpec)}


def dest_of(flag: str) -> str:
    """The argparse attribute a flag's value lands in."""
    return flag.removeprefix("--").replace("-", "_")


def flag_values(args: argparse.Namespace, table: dict[str, str]) -> dict[str, object]:
    """{field: value} of every flag of `table` (a --no-… flag gives False where it is given)."""
    return {
        field: not getattr(args, dest_of(flag)) if flag.startswith("--no-") else getattr(args, dest_of(flag))
        for flag, field in table.items()
    }


def spec_of(args: argparse.Namespace, **choices) -> PruneSpec:
    """The pruning spec the `SPEC_FLAGS` give (`choices`: the rest, per command); no --ratio and no --target-params
    is the spec's default ratio."""
    values = flag_values(args, SPEC_FLAGS)
    if values["ratio"] is None and values["target_params"] is None:
        values["ratio"] = SPEC.ratio
    return PruneSpec(**values, **choices)


def prune_options(args: argparse.Namespace) -> PruneOptions:
    values = flag_values(args, PRUNE_FLAGS)
    spec = spec_of(args, **{field: value for field, value in values.items() if field in SPEC_FIELDS})
    if spec.sequential:
        check_sequential(spec)
    if spec.sequential and args.refit_calib:
        raise AdaPrunerError("--sequential refits each layer on the --calib windows: drop --refit-calib")
    return PruneOptions(spec=spec, **{field: value for field, value in values.items() if field not in SPEC_FIELDS})


PRUNE_EVAL_FLAGS = {"--seq-len": "seq_len", "--max-eval-windows": "max_windows", "--batch-size": "batch_size"}


def prune_eval_options(args: argparse.Namespace) -> EvalOptions | None:
    """The before/after perplexity of `prune` (None with --no-eval)."""
    return None if args.no_eval else EvalOptions(**flag_values(args, PRUNE_EVAL_FLAGS))


def run_prune(args: argparse.Namespace) -> int:
    from adapruner.commands.prune import prune_and_save, prune_memory_plan_of

    if args.memory_plan:
        plan = prune_memory_plan_of(
            args.model, prune_options(args), placement_of(args), args.from_study, args.stock_config
        )
        print(plan.table())
        return 0
    report = prune_and_save(
        args.model,
        prune_options(args),
        args.out,
        placement_of(args),
        prune_eval_options(args),
        study=args.from_study,
        recompute=args.recompute,
        stock_config=args.stock_config,
    )
    if "units_differing_from_study" in report:
        print(f"recomputed plan vs the study's: {report['units_differing_from_study']} units differ")
    rows = [
        ["params", report["params_before"], report["params_after"]],
        ["ppl wiki", _maybe(report["ppl_wiki_before"]), _maybe(report["ppl_wiki_after"])],
        ["time (s)", "", round(report["total_seconds"], 1)],
    ]
    how = (
        f"r={report['ratio']:.3f}"
        if report["ratio"] is not None
        else f"{100 * report['params_removed_fraction']:.1f}% removed"
    )
    print(format_table(["", "dense", f"pruned ({report['options']['spec']['metric']}, {how})"], rows))
    print(f"saved to {args.out} (report.json beside the model)")
    return 0


SEARCH_FLAGS = {  # SearchOptions field → the flag's dest, where they differ or the text needs parsing
    "pools": lambda a: [p.strip() for p in a.pools.split(",") if p.strip()],
    "metrics": lambda a: tuple(registered(name).name for name in _names(a.metrics) or (a.metrics,)),
    "aggregations": lambda a: _choices(a.aggregations, AGGREGATIONS, "--aggregations"),
    "sample_counts": lambda a: _int_list(a.sample_counts, "--sample-counts"),
    "allocations": lambda a: _choices(a.allocations, ALLOCATIONS, "--allocations"),
    "compensations": lambda a: _choices(a.compensations, COMPENSATIONS, "--compensations"),
    "statistics": lambda a: _choices(a.statistics, STATISTICS, "--statistics"),
    "cache_mem_gb": lambda a: a.cache_mem,
    "stages": lambda a: _int_list(a.stages, "--stages"),
    "front": lambda a: () if a.front is None else _fraction_list(a.front, "--front"),
    "survivors": lambda a: _int_list(a.survivors, "--survivors"),
    "spec": lambda a: spec_of(a),
}


def search_options(args: argparse.Namespace) -> SearchOptions:
    """Every SearchOptions field from the flag of the same name (or its entry in `SEARCH_FLAGS`)."""
    options = SearchOptions(
        **{
            f.name: SEARCH_FLAGS[f.name](args) if f.name in SEARCH_FLAGS else getattr(args, f.name)
            for f in fields(SearchOptions)
        }
    )
    if options.spec.sequential:  # the best trial is re-applied layer by layer: every metric must allow it
        for metric in options.metrics:
            check_sequential(options.spec.with_(metric=metric))
    return options


def run_search_command(args: argparse.Namespace) -> int:
    from adapruner.commands.search import memory_plan_of, resolved, run_search, study_dir

    if args.memory_plan:
        plan = memory_plan_of(resolved(search_options(args))[0])
        print(plan.table())
        plan.check(cache_exists=True)
        return 0
    best = run_search(search_options(args), Path(args.out))
    files = study_dir(Path(args.out), args.study)
    spec = best.prune_spec
    if best.structure == "widths":
        kl = "" if best.val_kl is None else f"val KL {best.val_kl:.4f}, "
        found = f"best structure: trial {best.trial} ({spec.metric}, {spec.compensation} refit), {kl}"
        plots = "history.png, widths.png" + (", front.json, front.png" if args.front else "")
    else:
        found = f"best trial {best.trial}: {spec.metric}/{spec.aggregation} on {best.scored_on}, "
        plots = "history.png"
    print(f"{found}val ppl {best.val_ppl:.3f}")
    print(
        f"wrote {files}/best.json, {plots}; apply with: adapruner prune --model {args.model} --from-study "
        f"{files} --out DIR"
        + (" [--target-params P of the front]" if best.structure == "widths" and args.front else "")
    )
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise AdaPrunerError(f"{flag} {text!r}: write comma-separated integers, e.g. 4,8,16") from None
    if not values or min(values) < 1:
        raise AdaPrunerError(f"{flag} {text!r}: counts must be at least 1")
    return values


def _fraction_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise AdaPrunerError(f"{flag} {text!r}: write comma-separated fractions, e.g. 0.2,0.35,0.5") from None
    if not all(0 < v < 1 for v in values):
        raise AdaPrunerError(f"{flag} {text!r}: every budget must lie in (0, 1)")
    return values


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    chosen = _names(text)
    unknown = [name for name in chosen if name not in allowed]
    if unknown or not chosen:
        raise AdaPrunerError(
            f"{flag}: unknown choice {unknown[0] if unknown else text!r}: pick from {', '.join(allowed)}"
        )
    return chosen


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


RUN_FLAGS = {  # flag → RunOptions field (the search's flags: `SEARCH_FLAGS`)
    "--finetune-steps": "finetune_steps",
    "--finetune-data": "finetune_data",
    "--tasks": "tasks",
    "--task-limit": "task_limit",
    "--max-eval-windows": "max_eval_windows",
    "--full-seq-len": "full_seq_len",
    "--batch-size": "batch_size",
    "--speed": "speed",
}


def run_options(args: argparse.Namespace) -> RunOptions:
    values = flag_values(args, RUN_FLAGS)
    return RunOptions(search=search_options(args), **values | {"tasks": _names(values["tasks"])})


def run_pipeline_command(args: argparse.Namespace) -> int:
    from adapruner.commands.run import run_pipeline

    run_pipeline(run_options(args), Path(args.out))
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/report.md, report.json, layers.png, search_history.png")
    return 0


LORA_FLAGS = {  # flag → LoraOptions field
    "--lora-r": "r",
    "--lora-alpha": "alpha",
    "--lora-dropout": "dropout",
    "--lr": "lr",
    "--cutoff": "cutoff",
    "--batch-size": "batch_size",
    "--steps": "max_steps",
    "--minutes": "max_minutes",
    "--eval-every": "eval_every",
    "--train-on-prompt": "train_on_prompt",
    "--seed": "seed",
}


def lora_options(args: argparse.Namespace) -> LoraOptions:
    return LoraOptions(**flag_values(args, LORA_FLAGS))


def run_finetune(args: argparse.Namespace) -> int:
    from adapruner.commands.finetune import finetune_and_save

    report = finetune_and_save(
        args.model,
        args.data,
        lora_options(args),
        args.out,
        placement_of(args),
        keep_adapter=args.keep_adapter,
        val_windows=args.val_windows,
        seq_len=args.seq_len,
    )
    after = report["val_ppl_history"][-1][1] if report["val_ppl_history"] else float("nan")
    print(
        format_table(
            ["", "before", "after"],
            [
                ["val ppl (wiki)", report["val_ppl_before"], after],
                ["train loss (last 10)", "", report["train_loss_last10"]],
            ],
        )
    )
    print(f"{report['stopped']}; saved to {args.out}")
    return 0


EVAL_FLAGS = {  # flag → EvalOptions field (--no-ppl: no perplexity)
    "--ppl": "ppl",
    "--seq-len": "seq_len",
    "--max-eval-windows": "max_windows",
    "--batch-size": "batch_size",
    "--tasks": "tasks",
    "--limit": "task_limit",
    "--speed": "speed",
}


def eval_options(args: argparse.Namespace) -> EvalOptions:
    values = flag_values(args, EVAL_FLAGS)
    return EvalOptions(**values | {"ppl": None if args.no_ppl else values["ppl"], "tasks": _names(values["tasks"])})


def run_eval(args: argparse.Namespace) -> int:
    from adapruner.commands.eval import evaluate_model

    report_path = (
        Path(args.report) if args.report else (Path(args.model) / "report.json" if Path(args.model).is_dir() else None)
    )
    measured = evaluate_model(args.model, eval_options(args), placement_of(args), report_path)
    rows = [
        [
            name,
            ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items() if k != "windows"
            ),
        ]
        for name, values in measured["results"].items()
    ]
    print(f"{args.model}: {measured['params']:,} params, {measured['seconds']:.1f} s")
    print(format_table(["result", "value"], rows))
    if report_path is not None:
        print(f"wrote {report_path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from adapruner.commands.export import export_model

    placement = Placement.of("cpu", "float32", args.trust_remote_code)
    written = export_model(args.model, args.gguf, args.outtype, placement, args.imatrix, args.seq_len)
    print(f"wrote {written['gguf']} ({written['bytes'] / 2**20:.1f} MiB, {written['outtype']})")
    if written["fallback_summary"]:
        print(written["fallback_summary"])
    print(f"wrote {written['modelfile']}: ollama create NAME -f {written['modelfile']}")
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from adapruner.searching.dashboard import serve

    serve(Path(args.out), args.port, args.storage)
    return 0


def _maybe(value: float | None) -> object:
    return "-" if value is None else value


if __name__ == "__main__":
    sys.exit(main())
