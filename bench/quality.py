"""Wiki perplexity of SmolLM2-135M pruned to a parameter budget by each recipe: `python -m bench.quality`.

For each `--targets` fraction p of all parameters removed (every method removes the same count, within one MLP
channel), without fine-tuning:
  best, paper, llm-pruner, flap   the named recipes of `adapruner.recipes` (`--peers`): best is what `adapruner prune`
               does with no flag; paper is AdaPruner's plain method; llm-pruner (taylor1, sum, uniform, whole kv groups,
               no compensation) and flap (fluct, global allocation of standardised scores, bias) the published peers;
  METRIC/ALLOCATION/COMPENSATION   each point of the grid (`--metrics` × `--allocations` × `--compensations`);
  the named recipes of `--recipes` (issue 22: OBS selection, error allocation, sequential pruning; see RECIPES);
  searched     `adapruner search` under the same budget (`--trials` trials in the space of `--search-recipe`, the
               CLI's default space unless told; `--search-*` flags override it), its best trial's plan applied and
               compensated as it was scored.
Fixed recipes calibrate on `--calib` (seeded) unless the recipe names its own; every model is scored on the same
held-out wiki *evaluation* windows, which neither calibration nor the search's validation saw. Writes
bench/results/quality.json, keeping the rows of (target, method) pairs not measured this time (`--metrics ''` and
`--trials 0` measure the named recipes alone).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from adapruner.choosing.allocation import count_params
from adapruner.choosing.spec import DEFAULT_DAMP, PruneSpec
from adapruner.commands.search import run_search
from adapruner.cutting.pruning import PruneOptions, apply_study_plan, prune_model
from adapruner.data.calibration import pool_windows
from adapruner.evaluation.evaluate import perplexity
from adapruner.model.models import load_model
from adapruner.output.report import format_table
from adapruner.recipes import RECIPES as NAMED
from adapruner.recipes import recipe_prune_options, search_recipe
from adapruner.searching.search_options import SearchOptions

RECIPES = {  # issue 22's recipes, by name (`--recipes`); calib: wiki windows where not `--calib`
    "obs": dict(metric="obs", allocation="uniform", compensation="lsq"),
    "obs/error": dict(metric="obs", allocation="error", compensation="lsq"),
    "obs/sequential": dict(metric="obs", allocation="uniform", compensation="lsq", sequential=True),
    "obs/256": dict(metric="obs", allocation="uniform", compensation="lsq", calib=256, damp=0.3),
    "fluct/256": dict(metric="fluct", allocation="uniform", compensation="lsq", calib=256, damp=0.3),  # the control
    "obs/error/512": dict(metric="obs", allocation="error", compensation="lsq", calib=512, damp=0.3),
    "obs/error/sequential/512": dict(
        metric="obs", allocation="error", compensation="lsq", sequential=True, calib=512, damp=0.3
    ),
    "fluct/loss/256": dict(metric="fluct", allocation="loss", compensation="lsq", calib=256, damp=0.3),
    "fluct/loss/all/256": dict(
        metric="fluct", allocation="loss", compensation="lsq", calib=256, damp=0.3, layers="all"
    ),
}


def measure(name: str, model, dense_params: int, windows: torch.Tensor, seconds: float, **config) -> dict:
    params = count_params(model)
    return {
        "method": name,
        "params": params,
        "removed": 1 - params / dense_params,
        "ppl": perplexity(model, windows, desc=name),
        "seconds": seconds,
        **config,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--targets", default="0.2,0.12", help="fractions of all parameters removed")
    parser.add_argument("--calib", default="wiki:32", help="calibration windows of the fixed recipes")
    parser.add_argument(
        "--granularity",
        default="query",
        choices=("kv", "query"),
        help="attention units of the grid, FLAP and the search",
    )
    parser.add_argument("--metrics", default="taylor2,act,fluct", help="the grid's metrics ('': no grid)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"named recipes ({', '.join(RECIPES)}; '': none)")
    parser.add_argument("--peers", default=",".join(NAMED), help="recipes of adapruner.recipes ('': none)")
    parser.add_argument("--allocations", default="uniform,global")
    parser.add_argument("--compensations", default="none,bias,lsq")
    parser.add_argument("--trials", type=int, default=30, help="the search's trial budget (0: no search)")
    parser.add_argument("--search-recipe", default="best", help="the search space's recipe (adapruner.recipes)")
    parser.add_argument("--search-metrics", default=None, help="metrics the search may choose")
    parser.add_argument("--search-allocations", default=None, help="allocations the search may choose")
    parser.add_argument("--search-samples", default="", help="sample counts the search may choose ('': the recipe's)")
    parser.add_argument("--search-compensations", default=None, help="compensations the search may choose")
    parser.add_argument("--search-refit", default=None, help="the search's refit pool (--refit-calib; none: none)")
    parser.add_argument("--search-statistics", default=None, help="the search's --statistics choices")
    parser.add_argument("--search-damp", type=float, default=None, help="the search's lsq damping")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-eval-windows", type=int, default=200, help="the first N evaluation windows (all: 1116)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench-quality", help="scratch directory for the searches (replaced)")
    parser.add_argument("--out", default="bench/results/quality.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)

    dense, tokenizer = load_model(args.model)
    windows = pool_windows(tokenizer, "wiki", args.seq_len, "eval")[: args.max_eval_windows]
    dense_params = count_params(dense)
    rows = [measure("dense", dense, dense_params, windows, 0.0, target=0.0)]
    grid = {
        f"{m}/{a}/{c}": dict(metric=m, allocation=a, compensation=c)
        for m, a, c in itertools.product(
            names(args.metrics), args.allocations.split(","), args.compensations.split(",")
        )
    }
    for target in map(float, args.targets.split(",")):
        for name in names(args.peers):
            model, started = copy.deepcopy(dense), time.perf_counter()
            options = replace(recipe_prune_options(name, ratio=None, target_params=target), seed=args.seed)
            options = replace(options, seq_len=args.seq_len)
            prune_model(model, tokenizer, options, progress=False)
            seconds = time.perf_counter() - started
            recipe = {
                k: getattr(options.spec, k) for k in ("metric", "allocation", "compensation", "granularity", "layers")
            }
            row = measure(name, model, dense_params, windows, seconds, target=target, calib=options.calib, **recipe)
            rows.append({**row, "damp": options.spec.damp})
            print(f"{target} {name}: ppl {rows[-1]['ppl']:.2f}", flush=True)
        chosen = {name: RECIPES[name] for name in names(args.recipes)}
        for name, recipe in {**chosen, **grid}.items():
            model, started = copy.deepcopy(dense), time.perf_counter()
            spec = PruneSpec(
                None,
                target_params=target,
                granularity=recipe.get("granularity", args.granularity),
                metric=recipe["metric"],
                allocation=recipe["allocation"],
                compensation=recipe["compensation"],
                sequential=recipe.get("sequential", False),
                damp=recipe.get("damp", DEFAULT_DAMP),
                layers=recipe.get("layers"),
            )
            calib = f"wiki:{recipe['calib']}" if "calib" in recipe else args.calib
            options = PruneOptions(spec, calib=calib, seq_len=args.seq_len, seed=args.seed)
            prune_model(model, tokenizer, options, progress=False)
            seconds = time.perf_counter() - started
            config = {key: value for key, value in recipe.items() if key != "calib"}
            rows.append(measure(name, model, dense_params, windows, seconds, target=target, calib=calib, **config))
            print(f"{target} {name}: ppl {rows[-1]['ppl']:.2f}", flush=True)
        if args.trials:
            work = Path(args.work) / f"target-{target}"
            shutil.rmtree(work, ignore_errors=True)
            started = time.perf_counter()
            space = search_recipe(args.search_recipe)
            refit = space["refit_calib"] if args.search_refit is None else args.search_refit
            search = SearchOptions(
                model=args.model,
                spec=PruneSpec(
                    None,
                    target_params=target,
                    granularity=space["granularity"],
                    damp=args.search_damp or space["damp"],
                    layers=space["layers"],
                ),
                seq_len=args.seq_len,
                seed=args.seed,
                metrics=listed(args.search_metrics, space["metrics"]),
                aggregations=space["aggregations"],
                sample_counts=tuple(int(n) for n in names(args.search_samples)) or space["sample_counts"],
                allocations=listed(args.search_allocations, space["allocations"]),
                compensations=listed(args.search_compensations, space["compensations"]),
                statistics=listed(args.search_statistics, space["statistics"]),
                refit_calib=None if refit == "none" else refit,
                trials=args.trials,
            )
            best = run_search(search, work)
            model = copy.deepcopy(dense)
            apply_study_plan(model, best, tokenizer, progress=False)
            rows.append(
                measure(
                    "searched",
                    model,
                    dense_params,
                    windows,
                    time.perf_counter() - started,
                    target=target,
                    val_ppl=best.val_ppl,
                    metric=best.prune_spec.metric,
                    aggregation=best.prune_spec.aggregation,
                    allocation=best.prune_spec.allocation,
                    compensation=best.prune_spec.compensation,
                    slope=best.prune_spec.depth_slope,
                    samples=len(best.samples) if best.statistics == "subset" else best.refit_calib,
                    refit=best.refit_calib,
                )
            )
            print(f"{target} searched: ppl {rows[-1]['ppl']:.2f}", flush=True)
        write(args, windows, rows)  # after every target: a long run keeps what it measured


def names(listed: str) -> list[str]:
    return [name for name in listed.split(",") if name]


def listed(flag: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """A --search-* flag's choices, or the recipe's."""
    return tuple(names(flag)) if flag is not None else tuple(default)


def write(args: argparse.Namespace, windows: torch.Tensor, rows: list[dict]) -> None:
    measured = {(row["target"], row["method"]) for row in rows}  # rows of other (target, method) pairs are kept
    earlier = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    same = earlier.get("model") == args.model and earlier.get("eval_windows") == int(windows.shape[0])
    same = same and earlier.get("args", {}).get("seq_len") == args.seq_len  # rows of one evaluation only
    kept = earlier["rows"] if same else []
    rows = [row for row in kept if (row["target"], row["method"]) not in measured] + rows
    rows.sort(key=lambda row: -row["target"] if row["target"] else -1.0)
    dense_ppl = rows[0]["ppl"]
    print(
        format_table(
            ["target", "method", "params", "removed", "wiki ppl", "× dense", "s"],
            [
                [
                    r["target"],
                    r["method"],
                    r["params"],
                    round(r["removed"], 4),
                    r["ppl"],
                    round(r["ppl"] / dense_ppl, 2),
                    round(r["seconds"], 1),
                ]
                for r in rows
            ],
        )
    )
    payload = {
        "model": args.model,
        "args": vars(args),
        "eval_windows": int(windows.shape[0]),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
