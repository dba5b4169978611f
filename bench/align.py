"""What `--align` buys: SmolLM2 pruned to the same parameter budget with MLP widths kept in multiples of 1, 64 and
128 channels — perplexity on held-out windows and transformers' prefill/decode speed-up over dense, measured in one
run on this machine.

    python -m bench.align [--target 0.2] [--aligns 1,64,128] [--windows 50]

Each row prunes a fresh copy with one recipe (`--metric`, `--allocation`, `--compensate`, calibration `wiki:16` at
128 tokens), evaluates the first `--windows` evaluation windows of 128 tokens, and times the model as
`adapruner.evaluation.speed` does (prefill 512 tokens at batch 1 and 8, decode 128 tokens). Writes
bench/results/align.json."""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from adapruner.choosing.allocation import count_params
from adapruner.choosing.spec import PruneSpec
from adapruner.commands.eval import eval_windows
from adapruner.cutting.pruning import PruneOptions, prune_model
from adapruner.evaluation.evaluate import perplexity
from adapruner.evaluation.speed import SpeedShape, measure_speed, speedups
from adapruner.model.models import load_model
from adapruner.model.structure import decoder_layers, layer_info

RESULTS = Path(__file__).with_name("results") / "align.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--aligns", default="1,64,128")
    parser.add_argument("--windows", type=int, default=50)
    parser.add_argument("--metric", default="act")
    parser.add_argument("--allocation", default="global")
    parser.add_argument("--compensate", default="lsq")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dense, tokenizer = load_model("smollm2")
    windows = eval_windows(tokenizer, "wiki", 128, args.windows)
    shape = SpeedShape(repeats=args.repeats)
    dense_speed = measure_speed(dense, shape)
    rows = [
        {"align": None, "ppl": perplexity(dense, windows, progress=False), "params": count_params(dense), **dense_speed}
    ]
    for align in map(int, args.aligns.split(",")):
        model, started = copy.deepcopy(dense), time.perf_counter()
        spec = PruneSpec(
            None,
            target_params=args.target,
            metric=args.metric,
            allocation=args.allocation,
            compensation=args.compensate,
            align=align,
        )
        prune_model(model, tokenizer, PruneOptions(spec, calib="wiki:16", seq_len=128), progress=False)
        seconds = time.perf_counter() - started
        speed = measure_speed(model, shape)
        widths = sorted({layer_info(model, i).intermediate for i in range(len(decoder_layers(model)))})
        rows.append(
            {
                "align": align,
                "ppl": perplexity(model, windows, progress=False),
                "params": count_params(model),
                "prune_seconds": seconds,
                "mlp_widths": widths,
                **speed,
                **{f"speedup_{k}": v for k, v in speedups(dense_speed, speed).items()},
            }
        )
        print(f"align {align}: ppl {rows[-1]['ppl']:.2f}, {rows[-1]['params']:,} params, widths {widths}", flush=True)
    for row in rows:
        ratios = ", ".join(f"{k.removeprefix('speedup_')} {v:.2f}x" for k, v in row.items() if k.startswith("speedup_"))
        print(
            f"align {row['align']}: ppl {row['ppl']:.2f}  removed {1 - row['params'] / rows[0]['params']:.3f}  {ratios}"
        )
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, fp32"
    recipe = {
        "target": args.target,
        "metric": args.metric,
        "allocation": args.allocation,
        "compensate": args.compensate,
        "eval_windows": int(windows.shape[0]),
        "eval_seq_len": 128,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "recipe": recipe, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS} ({machine})")


if __name__ == "__main__":
    main()
