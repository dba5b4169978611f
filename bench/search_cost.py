"""What the cache saves per trial: `python -m bench.search_cost`.

For each metric, one trial configuration (the same samples) is run twice: from the activation cache, and
recomputing the statistics with a forward+backward of the dense model over the trial's samples (what a search
without a cache does). Both then prune a copy and score it on the same validation windows. Prints mean times
per stage, the importance-time ratio per metric, the whole-trial ratio per metric and overall, and whether
both paths kept the same units. Writes bench/results/search_cost.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from adapruner.evaluate import perplexity
from adapruner.cache import CachedImportance, cache_key, load_or_build
from adapruner.calibration import pool_windows
from adapruner.importance import Importance, needs
from adapruner.models import cache_root, load_model
from adapruner.prune import apply_plan, plan_pruning
from adapruner.report import format_table
from adapruner.statistics import collect_stats
from adapruner.structure import decoder_layers, default_layer_range, prunable_linears

METRICS = ("l1", "l2", "vector", "taylor2", "act", "taylor1", "mix")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def trial(model, importance, ratio, layers, val, batch_size):
    """(plan, seconds for importance+plan, seconds for prune copy, seconds for validation, ppl)."""
    plan, t_importance = timed(lambda: plan_pruning(model, importance, ratio, layers))
    pruned, t_prune = timed(lambda: _pruned_copy(model, plan))
    ppl, t_val = timed(lambda: perplexity(pruned, val, batch_size, progress=False))
    return plan, t_importance, t_prune, t_val, ppl


def _pruned_copy(model, plan):
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--pools", default="wiki,news,plays")
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8, help="calibration samples of the timed trial")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-windows", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default="bench/results/search_cost.json")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    layers = default_layer_range(len(decoder_layers(model)))
    key = cache_key(args.model, model, args.pools.split(","), args.pool_size, args.seq_len, layers, 0, activations=True)
    cache, t_build = timed(lambda: load_or_build(model, tokenizer, key, cache_root() / "activations", 2**34))
    val = pool_windows(tokenizer, "wiki", args.seq_len, "val")[: args.val_windows]
    samples = torch.linspace(0, cache.n_samples - 1, args.samples).round().long()
    windows = torch.stack([pool_windows(tokenizer, pool, args.seq_len, "calib")[index] for pool, index in (cache.addresses[i] for i in samples)])
    linears = prunable_linears(model, layers)

    rows, records = [], []
    for metric in METRICS:
        cached_t, fresh_t = [], []
        for _ in range(args.repeat):
            cached = trial(model, CachedImportance(cache, metric, "sum", samples), args.ratio, layers, val, 8)
            stats, t_stats = timed(lambda: collect_stats(model, linears, windows, needs(metric), progress=False))
            fresh = trial(model, Importance(metric, "sum", stats), args.ratio, layers, val, 8)
            cached_t.append(cached[1:4])
            fresh_t.append((t_stats + fresh[1], *fresh[2:4]))
        c = [sum(x) / args.repeat for x in zip(*cached_t)]
        f = [sum(x) / args.repeat for x in zip(*fresh_t)]
        same = cached[0] == fresh[0]
        records.append({"metric": metric, "cached": dict(zip(("importance", "prune", "val"), c)), "recompute": dict(zip(("importance", "prune", "val"), f)),
                        "same_plan": same, "val_ppl_cached": cached[4], "val_ppl_recompute": fresh[4]})
        rows.append([metric, c[0], f[0], f"{f[0] / c[0]:.1f}x", sum(c), sum(f), f"{sum(f) / sum(c):.1f}x", "yes" if same else "no"])
    total_cached = sum(sum(r["cached"].values()) for r in records)
    total_fresh = sum(sum(r["recompute"].values()) for r in records)
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"machine: {machine}; cache built in {t_build:.1f} s ({cache.n_samples} samples × {args.seq_len} tokens); trial: {args.samples} samples, {args.val_windows} validation windows")
    print(format_table(["metric", "importance cached s", "importance recompute s", "importance ratio", "trial cached s", "trial recompute s", "trial ratio", "same units"], rows))
    print(f"cached trial vs recompute, all metrics: {total_fresh / total_cached:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "cache_build_s": t_build, "overall_ratio": total_fresh / total_cached, "args": vars(args), "metrics": records}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
