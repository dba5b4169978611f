"""Wiki perplexity of SmolLM2-135M pruned by each metric at one ratio: `python -m bench.quality`.

Prints a table and writes bench/results/quality.json. Every method prunes a fresh copy of the dense model with
the same calibration windows (seeded) and is scored on the same held-out wiki evaluation windows.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from adapruner.calibration import pool_windows
from adapruner.evaluate import perplexity
from adapruner.models import load_model
from adapruner.prune import count_params
from adapruner.pruner import PruneOptions, prune_model
from adapruner.report import format_table

METHODS = ("random", "l2", "vector", "taylor1", "taylor2", "mix", "act")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--calib", default="wiki:16")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-eval-windows", type=int, default=None, help="default: the whole evaluation split")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/quality.json")
    args = parser.parse_args()

    dense, tokenizer = load_model(args.model)
    windows = pool_windows(tokenizer, "wiki", args.seq_len, "eval")[: args.max_eval_windows]
    rows = [{"method": "dense", "params": count_params(dense), "ppl": perplexity(dense, windows, desc="dense"), "prune_s": 0.0}]
    for metric in args.methods.split(","):
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        options = PruneOptions(ratio=args.ratio, metric=metric, calib=args.calib, seq_len=args.seq_len, seed=args.seed)
        prune_model(model, tokenizer, options)
        seconds = time.perf_counter() - started
        rows.append({"method": metric, "params": count_params(model), "ppl": perplexity(model, windows, desc=metric), "prune_s": seconds})
    print(format_table(["method", "params", "wiki ppl", "prune s"], [[r["method"], r["params"], r["ppl"], round(r["prune_s"], 1)] for r in rows]))
    payload = {
        "model": args.model, "ratio": args.ratio, "calib": args.calib, "seq_len": args.seq_len, "seed": args.seed,
        "eval_windows": int(windows.shape[0]), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
