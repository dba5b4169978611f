"""How many validation tokens rank structures stably? `python -m bench.rank_agreement` (issue 33, deliverable 3).

SmolLM2-135M, `best`'s choices at `--target` of the parameters removed (fluct scores, lsq refit at damp 0.3 from the
256-window wiki refit pool, as bench.width_search). `--structures` per-layer structures: the `loss` allocation's
counts and perturbations of them (each module's share w → max(0, (w + ε)·e^u − ε), u uniform in [−spread, spread],
repaired to the budget: `adapruner.searching.widths`). Each structure is scored once on 2·max(`--sizes`) wiki
*validation* windows (per window: KL from the dense model on its top 64, and log-perplexity) and on the first
`--max-eval-windows` *evaluation* windows (bench.quality's perplexity, the ground truth).
Printed, for n windows per set: Spearman's ρ between the structures' scores on two disjoint sets of n windows (is the
ranking stable?) and between one set's scores and the evaluation perplexity (does it rank what matters?), for both
objectives; JSON to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import time
from pathlib import Path

from scipy.stats import spearmanr
from tqdm import tqdm

from adapruner.choosing.selection import allocate
from adapruner.cutting.removal import cut
from adapruner.data.calibration import pool_windows
from adapruner.evaluation.divergence import dense_top_k, window_divergences
from adapruner.evaluation.evaluate import perplexity
from adapruner.model.models import load_model
from adapruner.model.structure import decoder_layers
from adapruner.output.report import format_table
from adapruner.recipes import recipe_prune_options
from adapruner.scoring.refit_pool import load_or_collect
from adapruner.searching.widths import LayerVariants, WidthSpace

EPSILON = 0.02  # the share a module the loss allocation leaves whole starts from (as bench.width_search)


def structures(space: WidthSpace, loss: dict, count: int, spread: float, seed: int) -> list[dict]:
    """The loss counts and `count − 1` perturbations of them, each repaired to the budget."""
    draw, base = random.Random(seed), space.shares(loss)
    drawn = [loss]
    while len(drawn) < count:
        shares = {
            m: max(0.0, (base[m] + EPSILON) * math.exp(draw.uniform(-spread, spread)) - EPSILON) for m in space.units
        }
        drawn.append(space.counts(shares))
    return drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.2, help="fraction of all parameters removed")
    parser.add_argument("--structures", type=int, default=16)
    parser.add_argument("--spread", type=float, default=0.5)
    parser.add_argument("--sizes", default="8,16,32,64,128", help="windows per set (two disjoint sets each)")
    parser.add_argument("--max-eval-windows", type=int, default=200)
    parser.add_argument("--min-keep", type=float, default=None, help="0 lets whole blocks go (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-file", default="runs/width-search-pool.safetensors")
    parser.add_argument("--out", default="bench/results/rank_agreement.json")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]

    model, tokenizer = load_model("smollm2")
    layers = range(len(decoder_layers(model)))
    pool = load_or_collect(
        model, tokenizer, ("wiki:256", 128, 0), layers, Path(args.pool_file), progress=True, fisher=True
    )
    val = pool_windows(tokenizer, "wiki", 128, "val")
    if val.shape[0] < 2 * max(sizes):
        raise SystemExit(f"error: the wiki validation split has {val.shape[0]} windows: lower --sizes")
    val = val[: 2 * max(sizes)]
    evaluation = pool_windows(tokenizer, "wiki", 128, "eval")[: args.max_eval_windows]
    spec = recipe_prune_options("best", target_params=args.target).spec
    spec = spec if args.min_keep is None else spec.with_(min_keep=args.min_keep)
    space, variants = WidthSpace.of(model, spec), LayerVariants(model, spec, pool, args.seed)
    loss = allocate(model, pool.importance(model, spec, args.seed), spec)[0]
    dense = dense_top_k(model, val)
    started = time.perf_counter()
    scored = []
    for counts in tqdm(structures(space, loss, args.structures, args.spread, args.seed), desc="structures"):
        pruned = copy.deepcopy(model)
        cut(pruned, variants.plan(counts), variants.updates(counts))
        kls, nlls = window_divergences(pruned, val, dense)
        scored.append((kls, nlls, perplexity(pruned, evaluation, progress=False)))
    seconds = (time.perf_counter() - started) / len(scored)
    truth = [s[2] for s in scored]
    rows = []
    for n in sizes:
        row = {"windows": n, "tokens": n * val.shape[1]}
        for k, objective in enumerate(("kl", "ppl")):
            first = [s[k][:n].mean().item() for s in scored]
            second = [s[k][max(sizes) : max(sizes) + n].mean().item() for s in scored]
            row[f"{objective}_sets_rho"] = spearmanr(first, second).statistic
            row[f"{objective}_eval_rho"] = spearmanr(first, truth).statistic
        rows.append(row)
    headers = ["windows per set", "tokens", "KL: set vs set ρ", "KL: set vs eval ρ", "ppl: set vs set ρ"]
    headers.append("ppl: set vs eval ρ")
    keys = ("kl_sets_rho", "kl_eval_rho", "ppl_sets_rho", "ppl_eval_rho")
    print(format_table(headers, [[r["windows"], r["tokens"], *(f"{r[k]:.2f}" for k in keys)] for r in rows]))
    print(f"evaluation ppl: loss counts {truth[0]:.2f}, structures {min(truth):.2f}–{max(truth):.2f}")
    about = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "target": args.target,
        "spread": args.spread,
        "min_keep": spec.min_keep,
        "seconds_per_structure": seconds,
        "eval_ppl": truth,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(about, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
