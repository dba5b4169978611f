"""What a structure-search trial costs: `python -m bench.structure_cost` (issue 33).

SmolLM2-135M with `best`'s choices at `--target` removed (the refit pool of bench.width_search, reused). Children of
the loss allocation's counts are drawn as the evolution draws them; for each, measured in one run, interleaved:
  trial    what `search --structure widths` runs per structure once its layer variants exist: the kept units of its
           counts, the refit output linears looked up, the pruned copy from the cached prefix, and the mean KL on
           `--windows` validation windows (`WidthStudy.score`);
  forward  one validation forward of the same pruned layers alone (`mean_kl` on a copy built beforehand).
Printed: median seconds of each and the ratio trial / forward; the layer variants' build (importance once, the loss
counts' start, each new (layer, module, count)'s lsq refit) and their size stored compactly (kept indices as int32,
refit output weights and bias in bf16), for the variants the run made and for K levels per module, with the
projection of that store and its solve FLOPs to the Llama-3.1-8B shape. Writes bench/results/structure_cost.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from adapruner.data.calibration import pool_windows
from adapruner.evaluation.divergence import mean_kl
from adapruner.model.models import load_model
from adapruner.model.structure import decoder_layers, layer_info
from adapruner.output.report import format_table
from adapruner.recipes import recipe_prune_options
from adapruner.scoring.refit_pool import load_or_collect
from adapruner.searching.evolution import MAX_SWAPS, Stages, mutated
from adapruner.searching.width_study import WidthSearch, WidthStudy
from bench.timing import device_name

LLAMA_8B = {"hidden": 4096, "layers": 32, "heads": 32, "head_dim": 128, "intermediate": 14336}
STORED_BYTES = 2  # bf16 refit weights


def variant_bytes(hidden: int, kept: int) -> int:
    """One compact variant: kept indices (int32) and the refit output linear (hidden × kept) with its bias, in bf16."""
    return 4 * kept + STORED_BYTES * hidden * (kept + 1)


def solve_flops(hidden: int, width: int, kept: int) -> float:
    """The lsq refit of one variant: rhs = W Σ[:, K] (2·hidden·width·kept), LU of Σ_KK (2/3·kept³) and the solve
    (2·kept²·hidden)."""
    return 2 * hidden * width * kept + 2 / 3 * kept**3 + 2 * kept**2 * hidden


def levels_store(hidden: int, layers: int, widths: tuple[int, int], levels: int) -> tuple[int, float]:
    """(bytes, solve FLOPs) of `levels` evenly spaced keep-levels (1/levels … 1 of the width; the whole block kept
    needs no refit, so it is left out, and 0 needs none either) for every layer's attention input and MLP input."""
    total_bytes, flops = 0, 0.0
    for width in widths:
        for level in range(1, levels):
            kept = round(width * level / levels)
            total_bytes += variant_bytes(hidden, kept)
            flops += solve_flops(hidden, width, kept)
    return layers * total_bytes, layers * flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.35, help="fraction of all parameters removed")
    parser.add_argument("--windows", type=int, default=16, help="validation windows a trial scores")
    parser.add_argument("--children", type=int, default=8, help="structures timed")
    parser.add_argument("--levels", type=int, default=9, help="K keep-levels per module for the store's projection")
    parser.add_argument("--pool-file", default="runs/width-search-pool.safetensors")
    parser.add_argument("--out", default="bench/results/structure_cost.json")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2")
    layers = range(len(decoder_layers(model)))
    pool = load_or_collect(model, tokenizer, ("wiki:256", 128, 0), layers, Path(args.pool_file), fisher=True)
    val = pool_windows(tokenizer, "wiki", 128, "val")[: args.windows]
    spec = recipe_prune_options("best", target_params=args.target).spec
    started = time.perf_counter()
    searched = WidthStudy(model, spec, pool, val, WidthSearch(Stages((args.windows,), ())))
    ranking_seconds = time.perf_counter() - started
    space, variants = searched.space, searched.variants

    draw = random.Random(0)
    parent = space.module_counts(searched.start)
    children = [parent] + [mutated(space, parent, draw.randint(1, MAX_SWAPS), draw) for _ in range(args.children - 1)]
    started = time.perf_counter()
    for units in children:  # the variants a generation asks for, built once
        searched.plan_and_updates(units)
    build_seconds = time.perf_counter() - started
    scorer = searched.scorers[0]
    scorer.kl(*searched.plan_and_updates(parent))  # the dense top-k, computed once per study
    trial_times, forward_times = [], []
    for units in children:
        counts = space.layer_counts(units)
        started = time.perf_counter()
        searched.score(counts, 0)
        trial_times.append(time.perf_counter() - started)
        pruned = scorer._from_start(*searched.plan_and_updates(units))
        started = time.perf_counter()
        mean_kl(pruned, scorer.windows, scorer.dense, scorer.batch_size, scorer.prefix)
        forward_times.append(time.perf_counter() - started)
    trial, forward = statistics.median(trial_times), statistics.median(forward_times)

    info = layer_info(model, 0)
    hidden, attention_width = info.attn.o_proj.out_features, info.n_heads * info.head_dim
    made = sum(
        variant_bytes(hidden, linear_update[0].shape[1])
        for refit in variants.refits.values()
        for linear_update in refit.values()
    )
    smol_bytes, smol_flops = levels_store(hidden, len(layers), (attention_width, info.intermediate), args.levels)
    big = LLAMA_8B
    big_bytes, big_flops = levels_store(
        big["hidden"], big["layers"], (big["heads"] * big["head_dim"], big["intermediate"]), args.levels
    )
    rows = [
        ["trial (assemble + KL)", f"{trial:.3f}"],
        ["one forward of the pruned layers", f"{forward:.3f}"],
        ["trial / forward", f"{trial / forward:.2f}x"],
    ]
    print(format_table([f"{args.windows} windows, {args.target:.0%} removed", "s (median)"], rows))
    print(
        f"variants: ranking {ranking_seconds:.1f} s once; {len(variants.refits)} refits for {len(children)} "
        f"structures in {build_seconds:.1f} s ({build_seconds / max(1, len(variants.refits)):.3f} s each), "
        f"{made / 2**20:.1f} MiB stored compactly"
    )
    print(
        f"K={args.levels} levels per module: SmolLM2 {smol_bytes / 2**20:.0f} MiB, {smol_flops / 1e9:.0f} GFLOP to "
        f"solve; Llama-3.1-8B shape {big_bytes / 2**30:.1f} GiB, {big_flops / 1e12:.0f} TFLOP to solve "
        f"(fp32: {big_flops / 67e12:.0f} s at an H100 SXM's 67 TFLOP/s peak)"
    )
    result = {
        "machine": device_name(torch.device("cpu")),
        "target": args.target,
        "windows": args.windows,
        "trial_seconds": trial,
        "forward_seconds": forward,
        "ratio": trial / forward,
        "trial_times": trial_times,
        "forward_times": forward_times,
        "ranking_seconds": ranking_seconds,
        "refits": len(variants.refits),
        "build_seconds": build_seconds,
        "stored_bytes": made,
        "levels": args.levels,
        "smollm2_levels_bytes": smol_bytes,
        "smollm2_levels_flops": smol_flops,
        "llama8b_levels_bytes": big_bytes,
        "llama8b_levels_flops": big_flops,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
