"""Does bf16 validation rank trials like fp32? `python -m bench.val_dtype`.

Draws `--trials` configurations from the search space (Optuna's RandomSampler, seeded), plans each from the cache,
and scores the same plan with a float32 and a bfloat16 `ValidationScorer`. Prints both perplexities per trial,
their relative difference, the Spearman rank correlation of the two columns and the time ratio, measured in one run.
Writes bench/results/val_dtype.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import optuna
import torch

from adapruner.choosing.spec import PruneSpec
from adapruner.data.calibration import pool_windows
from adapruner.model.models import cache_root, load_model
from adapruner.model.structure import decoder_layers, default_layer_range
from adapruner.output.report import format_table
from adapruner.scoring.cache import CandidatePool, cache_key, load_or_build
from adapruner.searching.search import SearchSpace, pool_blocks, suggest, trial_plan
from adapruner.searching.trial_scorer import ValidationScorer


def ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().double()


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks (no ties expected among perplexities)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/val_dtype.json")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    layers = default_layer_range(len(decoder_layers(model)))
    key = cache_key(
        args.model, model, CandidatePool(["wiki", "news", "plays"], args.pool_size, 128, 0), layers, activations=True
    )
    cache = load_or_build(model, tokenizer, key, cache_root() / "activations", 2**34)
    val = pool_windows(tokenizer, "wiki", 128, "val")[: args.val_windows]
    scorers = {dtype: ValidationScorer(model, val, layers.start, dtype) for dtype in ("float32", "bfloat16")}
    setting, space, blocks = (
        PruneSpec(args.ratio, layers=f"{layers.start}:{layers.stop}"),
        SearchSpace(),
        pool_blocks(cache, 4),
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    rows, records, seconds = [], [], {"float32": 0.0, "bfloat16": 0.0}
    for _ in range(args.trials):
        config = suggest(study.ask(), space, blocks)
        plan = trial_plan(model, cache, setting, config)
        ppl = {}
        for dtype, scorer in scorers.items():
            start = time.perf_counter()
            ppl[dtype] = scorer.score(plan)
            seconds[dtype] += time.perf_counter() - start
        change = ppl["bfloat16"] / ppl["float32"] - 1
        records.append(
            {"metric": config.metric, "aggregation": config.aggregation, "samples": len(config.samples), **ppl}
        )
        rows.append(
            [
                config.metric,
                config.aggregation,
                len(config.samples),
                ppl["float32"],
                ppl["bfloat16"],
                f"{100 * change:+.2f}%",
            ]
        )
    rho = spearman([r["float32"] for r in records], [r["bfloat16"] for r in records])
    worst = max(abs(r["bfloat16"] / r["float32"] - 1) for r in records)
    print(
        f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads; {args.val_windows} validation windows"
    )
    print(format_table(["metric", "agg", "samples", "val ppl fp32", "val ppl bf16", "bf16 vs fp32"], rows))
    print(
        f"Spearman rank correlation {rho:.3f}; largest relative difference {100 * worst:.2f}%; "
        f"bf16 validation vs fp32: {seconds['float32'] / seconds['bfloat16']:.1f}x faster"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": f"{platform.machine()} CPU",
        "args": vars(args),
        "spearman": rho,
        "max_relative_difference": worst,
        "seconds": seconds,
        "trials": records,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
