"""What the `loss` allocation's removal curves cost: `python -m bench.curve_cost` (issue 34, item 3).

SmolLM2-135M with `best`'s choices (fluct order, loss-weighted OBS costs, query heads, every layer), statistics from
the 256-window wiki refit pool (bench.width_search's, reused). The greedy removal curves of every module, in one run:
  factorised          what the allocation runs: one Cholesky of the permuted H and one product per module
                      (`obs.ordered_removal`), in fp32 (`obs.CURVE_DTYPE`);
  factorised (fp64)   the same in fp64 (what it ran before fp32);
  rank updates        the same steps costed by a rank update of W and H⁻¹ per step, fp64
                      (`obs.ordered_removal_by_updates`, what it ran first).
Printed: seconds of each, the rank updates' over the fp32 factorisation's, each path's largest relative difference
from the rank updates' curves, and whether its allocation's counts are theirs at each `--targets` budget; the seconds
of a whole loss allocation (curves and counts, mean of the targets). Writes bench/results/curve_cost.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

import adapruner.scoring.importance as importance_module
from adapruner.choosing.allocation_rules import allocation
from adapruner.choosing.selection import allocate, error_removals, removal_curves, score_layers
from adapruner.model.models import load_model
from adapruner.model.structure import decoder_layers
from adapruner.output.report import format_table
from adapruner.recipes import recipe_prune_options
from adapruner.scoring.obs import ordered_removal, ordered_removal_by_updates
from adapruner.scoring.refit_pool import load_or_collect
from bench.timing import device_name

PATHS = {
    "factorised": ordered_removal,
    "factorised (fp64)": functools.partial(ordered_removal, dtype=torch.float64),
    "rank updates": ordered_removal_by_updates,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="0.2,0.12,0.35,0.5", help="budgets whose counts are compared")
    parser.add_argument("--refit-calib", default="wiki:256")
    parser.add_argument(
        "--pool-file", default="runs/width-search-pool.safetensors", help="the refit pool, reused when it matches"
    )
    parser.add_argument("--out", default="bench/results/curve_cost.json")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]

    model, tokenizer = load_model("smollm2")
    layers = range(len(decoder_layers(model)))
    pool = load_or_collect(model, tokenizer, (args.refit_calib, 128, 0), layers, Path(args.pool_file), True, True)
    spec = recipe_prune_options("best", target_params=targets[0]).spec
    importance = pool.importance(model, spec, 0)
    every = {index: (spec.prune_attention, spec.prune_mlp) for index in layers}
    scores = score_layers(model, importance, every, spec.granularity)
    relative = allocation(spec.allocation).relative
    measured = {}
    for name, removal in PATHS.items():
        importance_module.ordered_removal = removal  # the path Importance.removal takes in a fixed order
        started = time.perf_counter()
        curves = removal_curves(error_removals(model, importance, every, spec, scores), spec.align, relative)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        counts = [allocate(model, importance, spec.with_(target_params=t))[0] for t in targets]
        allocation_seconds = (time.perf_counter() - started) / len(targets)
        measured[name] = {"seconds": seconds, "curves": curves, "counts": counts, "allocation": allocation_seconds}
    importance_module.ordered_removal = ordered_removal
    slow = measured["rank updates"]
    difference = {
        name: max(
            float(((m["curves"][k] - c).abs() / c.abs().clamp_min(1e-300)).max()) for k, c in slow["curves"].items()
        )
        for name, m in measured.items()
    }
    same = {name: [a == b for a, b in zip(m["counts"], slow["counts"])] for name, m in measured.items()}
    rows = [
        [name, f"{m['seconds']:.2f}", f"{m['allocation']:.2f}", f"{difference[name]:.1e}", str(all(same[name]))]
        for name, m in measured.items()
    ]
    headers = [
        "curves of 60 modules",
        "seconds",
        "loss allocation (s, mean of targets)",
        "vs rank updates",
        "same counts",
    ]
    print(format_table(headers, rows))
    ratio = slow["seconds"] / measured["factorised"]["seconds"]
    print(
        f"curves, factorised (fp32) vs rank updates: {ratio:.1f}x; same counts at {args.targets}: {same['factorised']}"
    )
    result = {
        "machine": device_name(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "targets": targets,
        "seconds": {name: m["seconds"] for name, m in measured.items()},
        "allocation_seconds": {name: m["allocation"] for name, m in measured.items()},
        "ratio": ratio,
        "largest_relative_difference": difference,
        "same_counts": same,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
