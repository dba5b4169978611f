"""AdaPruner search vs baselines at one trial budget: `python -m bench.search_quality`.

Three ways to spend the same number of trials, each scored on the wiki *validation* windows (in `--val-dtype`):
  tpe      Optuna TPE over the full space (samples, metric, aggregation) on the activation cache;
  random   random search over the same space and cache;
  llm-pruner  LLM-Pruner's fixed choice (taylor1, sum, 10 random wiki windows of 64 tokens), one draw per trial
           (trial k uses seed k); trial 0 alone is the literal fixed choice.
The best configuration of each is then applied to the dense model and measured on the wiki *evaluation*
windows (articles never used for calibration or validation). Writes bench/results/search_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from adapruner.choosing.allocation import count_params
from adapruner.choosing.spec import PruneSpec
from adapruner.commands.search import run_search
from adapruner.cutting.pruning import PruneOptions, apply_study_plan, prune_model
from adapruner.data.calibration import pool_windows
from adapruner.evaluation.evaluate import perplexity
from adapruner.model.models import load_model
from adapruner.output.report import format_table
from adapruner.searching.search_options import SearchOptions
from adapruner.searching.trial_scorer import VAL_DTYPES, resolve_val_dtype, shared_copy


def search_val_ppl(model, val, dtype: str) -> float:
    """Validation perplexity as the search scores it: the model's forward in `dtype`."""
    return perplexity(shared_copy(model, VAL_DTYPES[dtype]), val, progress=False)


def llm_pruner_trials(dense, tokenizer, ratio, trials, val, dtype, seq_len=64, n_samples=10):
    """(seed, val ppl) per draw of LLM-Pruner's fixed choice; each draw prunes a fresh copy."""
    results = []
    for seed in range(trials):
        model = copy.deepcopy(dense)
        prune_model(
            model,
            tokenizer,
            PruneOptions(PruneSpec(ratio, metric="taylor1"), calib=f"wiki:{n_samples}", seq_len=seq_len, seed=seed),
            progress=False,
        )
        results.append((seed, search_val_ppl(model, val, dtype)))
        print(f"llm-pruner draw {seed}: val ppl {results[-1][1]:.3f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--pool-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--max-eval-windows", type=int, default=None, help="default: the whole evaluation split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--val-dtype", default="auto", help="validation forward dtype of every method (auto: as adapruner search)"
    )
    parser.add_argument("--work", default="runs/bench-search", help="scratch directory for the studies (replaced)")
    parser.add_argument("--out", default="bench/results/search_quality.json")
    args = parser.parse_args()

    dense, tokenizer = load_model(args.model)
    args.val_dtype = resolve_val_dtype(args.val_dtype, torch.device("cpu"))
    val = pool_windows(tokenizer, "wiki", args.seq_len, "val")[: args.val_windows]
    evaluation = pool_windows(tokenizer, "wiki", args.seq_len, "eval")[: args.max_eval_windows]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    rows = [
        {
            "method": "dense",
            "val_ppl": search_val_ppl(dense, val, args.val_dtype),
            "eval_ppl": perplexity(dense, evaluation, desc="dense"),
            "params": count_params(dense),
            "config": None,
            "seconds": 0.0,
        }
    ]

    for sampler in ("tpe", "random"):
        started = time.perf_counter()
        options = SearchOptions(
            model=args.model,
            spec=PruneSpec(args.ratio),
            pool_size=args.pool_size,
            seq_len=args.seq_len,
            trials=args.trials,
            sampler=sampler,
            seed=args.seed,
            val_windows=args.val_windows,
            val_dtype=args.val_dtype,
        )
        best = run_search(options, work / sampler)
        seconds = time.perf_counter() - started
        model = copy.deepcopy(dense)
        apply_study_plan(model, best, tokenizer)  # the plan the search scored
        rows.append(
            {
                "method": f"adapruner-{sampler}",
                "val_ppl": best.val_ppl,
                "eval_ppl": perplexity(model, evaluation, desc=sampler),
                "params": count_params(model),
                "seconds": seconds,
                "config": {
                    k: getattr(best, k) for k in ("metric", "aggregation", "slope", "blocks", "addresses", "trial")
                },
            }
        )

    started = time.perf_counter()
    draws = llm_pruner_trials(dense, tokenizer, args.ratio, args.trials, val, args.val_dtype)
    seconds = time.perf_counter() - started
    for label, (seed, val_ppl) in (
        ("llm-pruner (seed 0)", draws[0]),
        ("llm-pruner (best of budget)", min(draws, key=lambda d: d[1])),
    ):
        model = copy.deepcopy(dense)
        prune_model(
            model,
            tokenizer,
            PruneOptions(PruneSpec(args.ratio, metric="taylor1"), calib="wiki:10", seq_len=64, seed=seed),
            progress=False,
        )
        rows.append(
            {
                "method": label,
                "val_ppl": val_ppl,
                "eval_ppl": perplexity(model, evaluation, desc=label),
                "params": count_params(model),
                "seconds": seconds if "best" in label else None,
                "config": {"metric": "taylor1", "aggregation": "sum", "samples": "wiki:10 × 64 tokens", "seed": seed},
            }
        )

    table = [
        [
            r["method"],
            r["params"],
            r["val_ppl"],
            r["eval_ppl"],
            "-" if not r["seconds"] else round(r["seconds"], 1),
            "-" if not r["config"] else f"{r['config']['metric']}/{r['config']['aggregation']}",
        ]
        for r in rows
    ]
    print(format_table(["method", "params", "val ppl", "eval ppl", "search s", "metric/agg"], table))
    payload = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "args": vars(args),
        "eval_windows": int(evaluation.shape[0]),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
