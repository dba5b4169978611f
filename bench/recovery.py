"""Does LoRA recover a pruned model? `python -m bench.recovery`.

Prunes SmolLM2-135M (taylor1, ratio 0.25, wiki:16 × 128 tokens), measures wiki evaluation perplexity, trains LoRA
(LLM-Pruner's recipe: r 8, alpha 16, dropout 0.05, lr 1e-4 by default; cutoff 256) for a stated step budget
on the wiki training articles, merges the adapter and measures again. Writes bench/results/recovery.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from adapruner.choosing.allocation import count_params
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.pruning import PruneOptions, prune_model
from adapruner.data.calibration import pool_windows
from adapruner.evaluation.evaluate import perplexity
from adapruner.evaluation.finetune import LoraOptions, finetune, merged
from adapruner.model.models import load_model
from adapruner.output.report import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--data", default="wiki")
    parser.add_argument("--max-eval-windows", type=int, default=256)
    parser.add_argument("--out", default="bench/results/recovery.json")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    evaluation = pool_windows(tokenizer, "wiki", 128, "eval")[: args.max_eval_windows]
    val = pool_windows(tokenizer, "wiki", 128, "val")[:16]
    dense_ppl = perplexity(model, evaluation, desc="dense")
    prune_model(model, tokenizer, PruneOptions(PruneSpec(args.ratio, metric="taylor1"), calib="wiki:16"))
    pruned_ppl = perplexity(model, evaluation, desc="pruned")
    options = LoraOptions(
        lr=args.lr,
        batch_size=args.batch_size,
        cutoff=args.cutoff,
        max_steps=args.steps,
        eval_every=max(1, args.steps // 3),
    )
    started = time.perf_counter()
    result = finetune(model, tokenizer, args.data, options, val)
    seconds = time.perf_counter() - started
    recovered = merged(result)
    recovered_ppl = perplexity(recovered, evaluation, desc="recovered")
    rows = [
        ["dense", "", dense_ppl],
        ["pruned (taylor1, r=0.25)", count_params(recovered), pruned_ppl],
        [f"+ LoRA {result.stopped.split(' reached')[0]}", count_params(recovered), recovered_ppl],
    ]
    print(format_table(["model", "params", "wiki eval ppl"], rows))
    print(
        f"LoRA: {len(result.losses)} steps × {args.batch_size} × {args.cutoff} tokens of {args.data!r} "
        f"in {seconds:.0f} s; validation ppl {result.val_ppl}"
    )
    payload = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "args": vars(args),
        "eval_windows": int(evaluation.shape[0]),
        "dense_ppl": dense_ppl,
        "pruned_ppl": pruned_ppl,
        "recovered_ppl": recovered_ppl,
        "lora_seconds": seconds,
        "val_ppl_history": result.val_ppl,
        "train_loss": result.losses,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
