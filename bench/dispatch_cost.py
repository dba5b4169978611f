"""What `--device-map` offload costs: `python -m bench.dispatch_cost [--disk-layers 15]`.

SmolLM2-135M (fp32, the CPU) twice in one run: resident, and spread by a device map that puts `--disk-layers` of its
middle decoder layers on disk (the rest in host memory; accelerate loads a disk layer's weights at each forward and,
in a backward, `reload_offloaded_in_backward` loads them again). Both build the same activation cache (one
forward+backward over the pool) and score the same trials (plan from the cache, compensation, validation perplexity).
Prints seconds per stage, the spread/resident ratio of each, and whether plans and perplexities agree.
Writes bench/results/dispatch_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from adapruner.choosing.spec import PruneSpec
from adapruner.data.calibration import pool_windows
from adapruner.model.big_model import Dispatch
from adapruner.model.models import load_model
from adapruner.model.structure import decoder_layers, default_layer_range
from adapruner.output.report import format_table
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key, candidate_pool
from adapruner.searching.search import TrialConfig, trial_plan, trial_updates
from adapruner.searching.trial_scorer import ValidationScorer

TRIALS = (
    TrialConfig(list(range(8)), "taylor2", "sum"),
    TrialConfig(list(range(0, 8, 2)), "taylor1", "sum", compensation="lsq"),
    TrialConfig(list(range(8)), "act", "mean", compensation="bias"),
)


def disk_map(model, disk_layers: int) -> dict[str, str]:
    """Every top-level module in host memory but `disk_layers` decoder layers from the middle, which go to disk."""
    n = len(decoder_layers(model))
    first = (n - disk_layers) // 2
    mapping = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapping.update({f"model.layers.{i}": "disk" if first <= i < first + disk_layers else "cpu" for i in range(n)})
    return mapping


def measure(model, tokenizer, pool, addresses, windows, layers) -> dict:
    key = cache_key(
        "smollm2",
        model,
        CandidatePool(["wiki"], pool.shape[0], pool.shape[1], 0),
        layers,
        activations=True,
        dtype="float32",
    )
    started = time.perf_counter()
    cache = build_cache(model, key, pool, addresses, batch_size=4, progress=False)
    result = {"cache_pass_s": time.perf_counter() - started, "trials": []}
    setting = PruneSpec(0.25, layers=f"{layers.start}:{layers.stop}")
    scorer = ValidationScorer(model, windows, layers.start, "float32", batch_size=4)
    for config in TRIALS:
        started = time.perf_counter()
        plan = trial_plan(model, cache, setting, config)
        ppl = scorer.score(plan, None, trial_updates(model, cache, setting, config, plan))
        result["trials"].append(
            {
                "metric": config.metric,
                "compensation": config.compensation,
                "seconds": time.perf_counter() - started,
                "val_ppl": ppl,
                "plan": plan.encode(),
            }
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--disk-layers", type=int, default=15, help="middle decoder layers on disk")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", default="bench/results/dispatch_cost.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    resident, tokenizer = load_model("smollm2")
    pool, addresses = candidate_pool(tokenizer, ["wiki"], 8, args.seq_len, 0)
    windows = pool_windows(tokenizer, "wiki", args.seq_len, "val")[:8]
    layers = default_layer_range(len(decoder_layers(resident)))
    with tempfile.TemporaryDirectory() as scratch:
        map_file = Path(scratch) / "map.json"
        map_file.write_text(json.dumps(disk_map(resident, args.disk_layers)))
        spread, _ = load_model("smollm2", dispatch=Dispatch.of(str(map_file), None, str(Path(scratch) / "offload")))
        results = {
            "resident": measure(resident, tokenizer, pool, addresses, windows, layers),
            "spread": measure(spread, tokenizer, pool, addresses, windows, layers),
        }
    rows = [
        [
            "cache pass",
            f"{results['resident']['cache_pass_s']:.2f}",
            f"{results['spread']['cache_pass_s']:.2f}",
            f"{results['spread']['cache_pass_s'] / results['resident']['cache_pass_s']:.2f}x",
            "-",
        ]
    ]
    for here, there in zip(results["resident"]["trials"], results["spread"]["trials"]):
        same = here["plan"] == there["plan"] and abs(here["val_ppl"] - there["val_ppl"]) <= 1e-6 * here["val_ppl"]
        rows.append(
            [
                f"trial {here['metric']}/{here['compensation']}",
                f"{here['seconds']:.2f}",
                f"{there['seconds']:.2f}",
                f"{there['seconds'] / here['seconds']:.2f}x",
                "same plan and val ppl" if same else f"DIFFER: {here['val_ppl']:.4f} vs {there['val_ppl']:.4f}",
            ]
        )
    print(
        f"SmolLM2-135M fp32 on {platform.machine()} CPU ({torch.get_num_threads()} threads): {args.disk_layers} of "
        f"{len(decoder_layers(resident))} layers on disk, pool 8 x {args.seq_len} tokens, 8 validation windows"
    )
    print(format_table(["stage", "resident s", "spread s", "spread / resident", "agreement"], rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                "disk_layers": args.disk_layers,
                "seq_len": args.seq_len,
                **results,
                "table": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
