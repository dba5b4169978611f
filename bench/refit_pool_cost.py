"""What collecting the refit pool layer by layer costs: `python -m bench.refit_pool_cost` (issue 34, item 2).

SmolLM2-135M, the `--refit-calib` windows (256 wiki windows of 128 tokens by default), the moments of every prunable
linear with the output projections' Grams, in one run:
  whole model     hooks over whole-model passes (`collect_input_moments`): every layer's Gram sums on the device at
                  once (what the refit pool runs where the memory plan keeps it on the device);
  layer by layer  the windows' hidden states through one decoder layer at a time, each layer's moments moved to host
                  memory when done (`collect_layer_moments`: where the plan puts the pool in host memory). Its
                  recording pass (`layer_inputs`: every layer's masks and rotary tables) runs the model once more.
Printed: seconds of each and their ratio, the largest relative difference of the moments, the bytes the device holds
in Grams at most under each. Writes bench/results/refit_pool_cost.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adapruner.data.calibration import calibration_samples
from adapruner.model.models import load_model
from adapruner.model.structure import decoder_layers, output_projections, prunable_linears
from adapruner.output.report import format_table
from adapruner.scoring.collect import collect_input_moments, collect_layer_moments
from bench.timing import device_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refit-calib", default="wiki:256")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default="bench/results/refit_pool_cost.json")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2")
    layers = range(len(decoder_layers(model)))
    ids = calibration_samples(tokenizer, args.refit_calib, args.seq_len, 0).input_ids
    outputs = output_projections(model, layers)
    started = time.perf_counter()
    whole = collect_input_moments(model, prunable_linears(model, layers) | outputs, ids, gram_of=outputs)
    whole_seconds = time.perf_counter() - started
    started = time.perf_counter()
    layered = collect_layer_moments(model, ids, layers, "cpu")
    layered_seconds = time.perf_counter() - started

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    difference = max(
        relative(getattr(layered[name], part), getattr(m, part))
        for name, m in whole.items()
        for part in ("mean", "square_mean", "gram")
        if getattr(m, part) is not None
    )
    grams = {name: m.gram.numel() * 4 for name, m in whole.items() if m.gram is not None}
    per_layer = max(sum(grams[name] for name in output_projections(model, [i])) for i in layers)
    rows = [
        ["whole model", f"{whole_seconds:.1f}", f"{sum(grams.values()) / 2**20:.1f}"],
        ["layer by layer", f"{layered_seconds:.1f}", f"{per_layer / 2**20:.1f}"],
    ]
    print(format_table(["refit pool moments", "seconds", "Grams on the device at most (MiB)"], rows))
    ratio = layered_seconds / whole_seconds
    print(f"layer by layer vs whole model: {ratio:.2f}x the time; largest relative moment difference {difference:.1e}")
    result = {
        "machine": device_name(torch.device("cpu")),
        "windows": int(ids.shape[0]),
        "seq_len": args.seq_len,
        "seconds": {"whole": whole_seconds, "layer_by_layer": layered_seconds},
        "time_ratio": ratio,
        "largest_relative_difference": difference,
        "device_gram_bytes": {"whole": sum(grams.values()), "layer_by_layer": per_layer},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
