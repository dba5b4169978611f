"""What the cache saves per trial: `python -m bench.search_cost`.

Trials: every (metric, sample count) pair of the search space's choices (the mix a random sampler, or TPE's
start-up trials, draws), samples taken round-robin over all blocks. Each trial runs twice:
  cached     importance from the activation cache (`search.trial_plan`), then the validation score;
  recompute  a forward+backward of the dense model over the trial's samples (`statistics.collect_stats`, what a
             search without the cache runs), importance from those statistics, then the same validation score.
Both paths share everything else the engine does per trial (plan, pruned copy, validation forward from the
prefix hidden states, in `--val-dtype`), so the ratio is the cache's own saving. Prints mean seconds per stage,
ratios per metric, per sample count and overall, and whether both paths kept the same units.
Writes bench/results/search_cost.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from adapruner.cache import cache_key, load_or_build
from adapruner.calibration import pool_windows
from adapruner.importance import Importance, needs
from adapruner.models import cache_root, load_model
from adapruner.prune import plan_pruning
from adapruner.report import format_table
from adapruner.search import DEFAULT_METRICS, DEFAULT_SAMPLE_COUNTS, PruneSetting, TrialConfig, pool_blocks, round_robin, trial_plan
from adapruner.statistics import collect_stats
from adapruner.structure import decoder_layers, default_layer_range, prunable_linears
from adapruner.validation import ValidationScorer, resolve_val_dtype

STAGES = ("statistics", "importance", "validation")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def ratio(fresh: float, cached: float) -> str:
    return f"{fresh / cached:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--pools", default="wiki,news,plays")
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--counts", default=",".join(map(str, DEFAULT_SAMPLE_COUNTS)), help="sample counts (the search's choices)")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-windows", type=int, default=16, help="as `adapruner search` (default 16)")
    parser.add_argument("--val-dtype", default="auto")
    parser.add_argument("--out", default="bench/results/search_cost.json")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    metrics = args.metrics.split(",")

    model, tokenizer = load_model(args.model)
    layers = default_layer_range(len(decoder_layers(model)))
    key = cache_key(args.model, model, args.pools.split(","), args.pool_size, args.seq_len, layers, 0, activations=True)
    cache, t_build = timed(lambda: load_or_build(model, tokenizer, key, cache_root() / "activations", 2**34))
    val_dtype = resolve_val_dtype(args.val_dtype, torch.device("cpu"))
    val = pool_windows(tokenizer, "wiki", args.seq_len, "val")[: args.val_windows]
    scorer, t_prefix = timed(lambda: ValidationScorer(model, val, layers.start, val_dtype))
    setting = PruneSetting(args.ratio, layers)
    blocks = list(pool_blocks(cache, 4).values())
    linears = prunable_linears(model, layers)

    records = []
    for metric in metrics:
        for count in counts:
            config = TrialConfig(round_robin(blocks, count), metric, "sum")
            windows = torch.stack([pool_windows(tokenizer, pool, args.seq_len, "calib")[index] for pool, index in (cache.addresses[i] for i in config.samples)])
            cached_plan, t_cached_importance = timed(lambda: trial_plan(model, cache, setting, config))
            cached_ppl, t_cached_val = timed(lambda: scorer.score(cached_plan))
            stats, t_stats = timed(lambda: collect_stats(model, linears, windows, needs(metric), progress=False))
            fresh_plan, t_fresh_importance = timed(lambda: plan_pruning(model, Importance(metric, "sum", stats), args.ratio, layers))
            fresh_ppl, t_fresh_val = timed(lambda: scorer.score(fresh_plan))
            records.append({
                "metric": metric, "samples": count,
                "cached": dict(zip(STAGES, (0.0, t_cached_importance, t_cached_val))),
                "recompute": dict(zip(STAGES, (t_stats, t_fresh_importance, t_fresh_val))),
                "same_plan": cached_plan == fresh_plan, "val_ppl_cached": cached_ppl, "val_ppl_recompute": fresh_ppl,
            })
            print(f"{metric:8s} {count:3d} samples: cached {sum(records[-1]['cached'].values()):.2f} s, recompute {sum(records[-1]['recompute'].values()):.2f} s", flush=True)

    def mean(rows, path, stage=None):
        values = [sum(r[path].values()) if stage is None else r[path][stage] for r in rows]
        return sum(values) / len(values)

    def importance_s(rows, path):  # statistics (recompute only) + importance and plan
        return mean(rows, path, "statistics") + mean(rows, path, "importance")

    by_metric = []
    for metric in metrics:
        rows = [r for r in records if r["metric"] == metric]
        same = sum(r["same_plan"] for r in rows)
        by_metric.append([metric, importance_s(rows, "cached"), importance_s(rows, "recompute"), ratio(importance_s(rows, "recompute"), importance_s(rows, "cached")),
                          mean(rows, "cached"), mean(rows, "recompute"), ratio(mean(rows, "recompute"), mean(rows, "cached")), f"{same}/{len(rows)}"])
    by_count = []
    for count in counts:
        rows = [r for r in records if r["samples"] == count]
        by_count.append([count, mean(rows, "cached"), mean(rows, "recompute"), ratio(mean(rows, "recompute"), mean(rows, "cached"))])
    overall = mean(records, "recompute") / mean(records, "cached")
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"machine: {machine}; cache of {cache.n_samples} samples × {args.seq_len} tokens ready in {t_build:.1f} s; "
          f"validation: {args.val_windows} windows in {val_dtype}, prefix (layers 0-{layers.start - 1}) computed once in {t_prefix:.2f} s")
    print(f"trials: metrics {', '.join(metrics)} × sample counts {', '.join(map(str, counts))}; times are means in seconds")
    print(format_table(["metric", "importance cached", "importance recompute", "importance ratio", "trial cached", "trial recompute", "trial ratio", "same units"], by_metric))
    print(format_table(["samples", "trial cached", "trial recompute", "trial ratio"], by_count))
    print(f"mean trial: cached {mean(records, 'cached'):.2f} s (validation {mean(records, 'cached', 'validation'):.2f} s), "
          f"recompute {mean(records, 'recompute'):.2f} s; cached trial vs recompute: {overall:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "cache_build_s": t_build, "prefix_s": t_prefix, "val_dtype": val_dtype, "overall_ratio": overall, "args": vars(args), "trials": records}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
