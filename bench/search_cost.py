"""What the cache saves per trial: `python -m bench.search_cost [--device cuda] [--shape llama-7b]`.

Trials: every (metric, sample count) pair of the search space's choices (the mix a random sampler, or TPE's
start-up trials, draws), samples taken round-robin over all blocks. Each trial runs twice:
  cached     importance from the activation cache (`search.trial_plan`), then the validation score;
  recompute  a forward+backward of the dense model over the trial's samples (`collect.collect_stats`, what a
             search without the cache runs), importance from those statistics, then the same validation score.
Both paths share everything else the engine does per trial (plan, pruned copy, validation forward from the
prefix hidden states, in `--val-dtype`), so the ratio is the cache's own saving. Prints mean seconds per stage,
ratios per metric, per sample count and overall, whether both paths kept the same units, the cache pass's time
and the projected time of a 100-trial search (cache pass + 100 mean cached trials).
`--shape`: `smollm2` (the embedded model, real text) or a LLaMA shape with random weights (`bench/shapes.py`).
Writes bench/results/search_cost[-SHAPE-DEVICE].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from adapruner.choosing.selection import plan_pruning
from adapruner.choosing.spec import DEFAULT_RATIO, PruneSpec
from adapruner.cli import DEVICE_HELP, DTYPE_HELP, device_arg
from adapruner.data.calibration import DEFAULT_SEQ_LEN
from adapruner.devices import DTYPE_CHOICES, Placement, dtype_name
from adapruner.kernels.dispatch import kernel_backend, scoring_backend
from adapruner.model.structure import decoder_layers, default_layer_range, prunable_linears
from adapruner.output.report import format_table
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key
from adapruner.scoring.collect import collect_stats
from adapruner.scoring.importance import Importance, needs
from adapruner.scoring.metrics import SEARCHED_METRICS as DEFAULT_METRICS
from adapruner.searching.search import DEFAULT_SAMPLE_COUNTS, TrialConfig, pool_blocks, round_robin, trial_plan
from adapruner.searching.trial_scorer import ValidationScorer, resolve_val_dtype
from bench.shapes import SHAPES, bench_windows, load_shape
from bench.timing import device_name, sync

STAGES = ("statistics", "importance", "validation")
PROJECTED_TRIALS = 100


def timed(fn, device: torch.device):
    """(result, wall seconds) with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def ratio(fresh: float, cached: float) -> str:
    return f"{fresh / cached:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--shape",
        default="smollm2",
        choices=SHAPES,
        help="smollm2 (embedded, real text) or a random-weight LLaMA shape",
    )
    parser.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO)
    parser.add_argument("--pools", default="wiki,news,plays")
    parser.add_argument("--pool-size", type=int, default=16, help="cached windows per pool (random shapes: one pool)")
    parser.add_argument(
        "--counts", default=",".join(map(str, DEFAULT_SAMPLE_COUNTS)), help="sample counts (the search's choices)"
    )
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    parser.add_argument("--val-windows", type=int, default=16, help="as `adapruner search` (default 16)")
    parser.add_argument("--val-dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward+backward of the cache pass")
    parser.add_argument(
        "--out",
        default=None,
        help=(
            "JSON file (default bench/results/search_cost.json for smollm2 on CPU, else search_cost-SHAPE-DEVICE.json)"
        ),
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    metrics = args.metrics.split(",")
    placement = Placement.of(args.device, args.dtype)
    device = placement.device

    (model, tokenizer), t_load = timed(lambda: load_shape(args.shape, device, placement.dtype), device)
    layers = default_layer_range(len(decoder_layers(model)))
    pools = args.pools.split(",") if args.shape == "smollm2" else ["random"]
    pool_ids, addresses, val = bench_windows(
        args.shape, tokenizer, pools, args.pool_size, args.seq_len, args.val_windows
    )
    key = cache_key(args.shape, model, CandidatePool(pools, args.pool_size, args.seq_len, 0), layers, activations=True)
    cache, t_build = timed(lambda: build_cache(model, key, pool_ids, addresses, args.batch_size), device)
    val_dtype = resolve_val_dtype(args.val_dtype, device)
    scorer, t_prefix = timed(lambda: ValidationScorer(model, val, layers.start, val_dtype), device)
    setting = PruneSpec(args.ratio, layers=f"{layers.start}:{layers.stop}")
    blocks = list(pool_blocks(cache, 4).values())
    linears = prunable_linears(model, layers)

    for (
        metric
    ) in metrics:  # one untimed trial per metric: first-call costs (kernel compiles, allocator growth) off the table
        scorer.score(trial_plan(model, cache, setting, TrialConfig(round_robin(blocks, counts[0]), metric, "sum")))
    records = []
    for metric in metrics:
        for count in counts:
            config = TrialConfig(round_robin(blocks, count), metric, "sum")
            windows = pool_ids[config.samples]  # the pool's windows, in the cache's sample order
            cached_plan, t_cached_importance = timed(lambda: trial_plan(model, cache, setting, config), device)
            cached_ppl, t_cached_val = timed(lambda: scorer.score(cached_plan), device)
            stats, t_stats = timed(
                lambda: collect_stats(model, linears, windows, needs(metric), progress=False), device
            )
            fresh_plan, t_fresh_importance = timed(
                lambda: plan_pruning(model, Importance(metric, "sum", stats), args.ratio, layers), device
            )
            stats = None  # free them: recompute statistics of a large model are twice its size in fp32
            fresh_ppl, t_fresh_val = timed(lambda: scorer.score(fresh_plan), device)
            records.append(
                {
                    "metric": metric,
                    "samples": count,
                    "cached": dict(zip(STAGES, (0.0, t_cached_importance, t_cached_val))),
                    "recompute": dict(zip(STAGES, (t_stats, t_fresh_importance, t_fresh_val))),
                    "same_plan": cached_plan == fresh_plan,
                    "val_ppl_cached": cached_ppl,
                    "val_ppl_recompute": fresh_ppl,
                }
            )
            print(
                f"{metric:8s} {count:3d} samples: cached {sum(records[-1]['cached'].values()):.2f} s, "
                f"recompute {sum(records[-1]['recompute'].values()):.2f} s",
                flush=True,
            )

    def mean(rows, path, stage=None):
        values = [sum(r[path].values()) if stage is None else r[path][stage] for r in rows]
        return sum(values) / len(values)

    def importance_s(rows, path):  # statistics (recompute only) + importance and plan
        return mean(rows, path, "statistics") + mean(rows, path, "importance")

    by_metric = []
    for metric in metrics:
        rows = [r for r in records if r["metric"] == metric]
        same = sum(r["same_plan"] for r in rows)
        by_metric.append(
            [
                metric,
                importance_s(rows, "cached"),
                importance_s(rows, "recompute"),
                ratio(importance_s(rows, "recompute"), importance_s(rows, "cached")),
                mean(rows, "cached"),
                mean(rows, "recompute"),
                ratio(mean(rows, "recompute"), mean(rows, "cached")),
                f"{same}/{len(rows)}",
            ]
        )
    by_count = []
    for count in counts:
        rows = [r for r in records if r["samples"] == count]
        by_count.append(
            [count, mean(rows, "cached"), mean(rows, "recompute"), ratio(mean(rows, "recompute"), mean(rows, "cached"))]
        )
    overall = mean(records, "recompute") / mean(records, "cached")
    machine = (
        device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    n_params = sum(p.numel() for p in model.parameters())
    projected = t_build + PROJECTED_TRIALS * mean(records, "cached")
    print(
        f"machine: {machine}; shape {args.shape} ({n_params / 1e9:.2f}B parameters, "
        f"{dtype_name(placement.dtype)}) built in {t_load:.1f} s; "
        f"importance by {scoring_backend(device, key.dtype)}, gather by {kernel_backend(device)}"
    )
    print(
        f"cache pass: {cache.n_samples} samples × {args.seq_len} tokens ({cache.nbytes / 2**30:.2f} GiB) "
        f"in {t_build:.1f} s; "
        f"validation: {args.val_windows} windows in {val_dtype}, "
        f"prefix (layers 0-{layers.start - 1}) computed once in {t_prefix:.2f} s"
    )
    print(
        f"trials: metrics {', '.join(metrics)} × sample counts {', '.join(map(str, counts))}; "
        "times are means in seconds"
    )
    print(
        format_table(
            [
                "metric",
                "importance cached",
                "importance recompute",
                "importance ratio",
                "trial cached",
                "trial recompute",
                "trial ratio",
                "same units",
            ],
            by_metric,
        )
    )
    print(format_table(["samples", "trial cached", "trial recompute", "trial ratio"], by_count))
    print(
        f"mean trial: cached {mean(records, 'cached'):.2f} s "
        f"(validation {mean(records, 'cached', 'validation'):.2f} s), "
        f"recompute {mean(records, 'recompute'):.2f} s; cached trial vs recompute: {overall:.1f}x"
    )
    print(
        f"projected {PROJECTED_TRIALS}-trial search: cache pass {t_build:.1f} s + "
        f"{PROJECTED_TRIALS} × {mean(records, 'cached'):.2f} s = {projected:.0f} s "
        f"({projected / 60:.1f} min; without the cache: {PROJECTED_TRIALS * mean(records, 'recompute') / 60:.1f} min)"
    )
    default_out = (
        "bench/results/search_cost.json"
        if (args.shape, device.type) == ("smollm2", "cpu")
        else f"bench/results/search_cost-{args.shape}-{device.type}.json"
    )
    out = Path(args.out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine,
        "shape": args.shape,
        "params": n_params,
        "placement": placement.describe(),
        "cache_build_s": t_build,
        "cache_GiB": cache.nbytes / 2**30,
        "prefix_s": t_prefix,
        "val_dtype": val_dtype,
        "overall_ratio": overall,
        "projected_100_trial_search_s": projected,
        "args": vars(args),
        "trials": records,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
