"""Every stage of the default search costed: `python -m bench.stage_cost` (issue 34, item 1; SmolLM2 for now).

The default recipe (`best`: act/fluct × uniform/global/loss, lsq refit, all scored and refit on the 256-window wiki
refit pool) on SmolLM2-135M in fp32, stage by stage, each measured on this machine and modelled:
  activation cache  one forward+backward over the candidate pool (3 pools × 32 windows), X and dY stored;
  refit pool        one forward over the refit windows, the output projections' Grams summed (2·in²·T);
  output Fisher     one forward+backward over its first 64 windows;
  trial (uniform)   act scores, the uniform counts, the lsq refit (a solve per output projection), the validation
                    forward of the pruned model over 16 windows;
  trial (loss)      fluct scores, the loss allocation's curves (per output projection a Cholesky, n³/3, and one
                    product, 2·out·n², in fp64), then as above;
  prune + save      the loss trial's plan cut from a copy and saved.
Model: FLOPs / this machine's GEMM rate in the stage's dtype; bytes / its copy bandwidth (the model read and written
twice) plus its disk write rate (all measured in the run, `rates`). A forward over T tokens costs
2·(linear weights)·T + 2·hidden·vocab·T + 4·T·S·hidden per layer (attention over windows of S tokens), a backward
twice that. Printed per stage: measured and modelled seconds, their ratio, and the peak RSS growth over the RSS
before the stage (heap freed earlier is reused). Then the same model projected to the Llama-3.1-8B and -70B shapes on
one H100 (989 TFLOP/s bf16, 67 TFLOP/s fp32 and fp64, 3.35 TB/s at `--efficiency` of peak; 2 GB/s to disk), with a
30-trial default search (a third of the trials `loss`). Writes bench/results/stage_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapruner.choosing.selection import plan_allocation
from adapruner.cutting.compensation import refit_updates
from adapruner.cutting.removal import cut
from adapruner.data.calibration import calibration_samples, pool_windows
from adapruner.model.structure import decoder_layers, output_projections, prunable_linears
from adapruner.output.report import format_table
from adapruner.output.saving import save_pruned
from adapruner.recipes import recipe_prune_options
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key, candidate_pool
from adapruner.scoring.collect import LOSS_WINDOWS, collect_input_moments, collect_output_fisher
from adapruner.scoring.refit_pool import RefitPool
from adapruner.searching.trial_scorer import ValidationScorer
from bench.shapes import load_shape
from bench.timing import device_name

SEQ_LEN, POOL_WINDOWS, REFIT_WINDOWS, VAL_WINDOWS = 128, 96, 256, 16
H100 = {"bf16": 989e12, "fp32": 67e12, "fp64": 67e12, "bandwidth": 3.35e12, "disk": 2e9}  # disk: an NVMe SSD
PROJECTED = {"llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256), "llama-3.1-70b": (8192, 80, 64, 8, 28672, 128256)}


@dataclass(frozen=True)
class Shape:
    """What the cost model reads of a decoder: hidden, layers, heads, kv heads, MLP width, vocabulary."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linear_params(self) -> int:
        """Weights of one decoder layer's linears."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.intermediate

    def model_bytes(self, element: int) -> int:
        """Bytes of the weights at `element` bytes each (embeddings and head untied)."""
        return element * (self.layers * self.linear_params + 2 * self.hidden * self.vocab)

    def forward(self, windows: int, kept: float = 1.0) -> float:
        """FLOPs of a forward over `windows` windows of SEQ_LEN tokens (`kept`: the share of layer weights left)."""
        tokens = windows * SEQ_LEN
        attention = 4 * tokens * SEQ_LEN * self.hidden * self.layers
        return 2 * kept * self.layers * self.linear_params * tokens + 2 * self.hidden * self.vocab * tokens + attention

    def outputs(self) -> list[tuple[int, int]]:
        """(out, in) of every output projection."""
        return [(self.hidden, self.hidden), (self.hidden, self.intermediate)] * self.layers


def shape_of(model) -> Shape:
    c = model.config
    return Shape(
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
    )


def stage_work(shape: Shape, element: int, removed: float = 0.2) -> dict[str, tuple[float, str]]:
    """(work, unit) per stage: FLOPs in the model's dtype ("model"), fp32, or fp32 with the curves in fp64; bytes
    ("bytes": the pruned copy made and cut in memory, then written to disk) for weights of `element` bytes."""
    grams = sum(2 * n * n for _out, n in shape.outputs()) * REFIT_WINDOWS * SEQ_LEN
    kept = 1 - removed
    solves = sum(
        2 * out * n * kept * n + 2 / 3 * (kept * n) ** 3 + 2 * (kept * n) ** 2 * out for out, n in shape.outputs()
    )
    curves = sum(n**3 / 3 + 2 * out * n * n for out, n in shape.outputs())
    trial = shape.forward(VAL_WINDOWS, kept) + solves
    return {
        "activation cache": (3 * shape.forward(POOL_WINDOWS), "model"),
        "refit pool": (shape.forward(REFIT_WINDOWS) + grams, "fp32"),
        "output Fisher": (3 * shape.forward(LOSS_WINDOWS), "model"),
        "trial (uniform)": (trial, "fp32"),
        "trial (loss)": (trial + curves, "fp64-curves"),
        "prune + save": (shape.model_bytes(element), "bytes"),
    }


def rates() -> dict[str, float]:
    """This machine's GEMM FLOP/s in fp32 and fp64 (1024 × 1536 @ 1536², the best of 5 rounds), its copy bandwidth and
    its disk write rate (bytes/s), measured now."""
    measured = {}
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        a, b = torch.randn(1024, 1536, dtype=dtype), torch.randn(1536, 1536, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(5):  # the best of 5 rounds: this machine is shared and noisy
            started = time.perf_counter()
            for _ in range(10):
                a @ b
            best = min(best, time.perf_counter() - started)
        measured[name] = 10 * 2 * 1024 * 1536 * 1536 / best
    data, target = torch.randn(32 * 2**20), torch.empty(32 * 2**20)
    target.copy_(data)
    started = time.perf_counter()
    for _ in range(5):
        target.copy_(data)
    measured["bandwidth"] = 5 * 2 * data.numel() * 4 / (time.perf_counter() - started)
    with tempfile.NamedTemporaryFile() as file:
        started = time.perf_counter()
        file.write(data.numpy().tobytes())
        file.flush()
        os.fsync(file.fileno())
        measured["disk"] = data.numel() * 4 / (time.perf_counter() - started)
    return measured


def modelled(work: float, unit: str, rate: dict[str, float], model_dtype: str, curves: float = 0.0) -> float:
    if unit == "bytes":  # read and written twice in memory (copy, cut), written once to disk
        return 4 * work / rate["bandwidth"] + work / rate["disk"]
    if unit == "model":
        return work / rate[model_dtype]
    if unit == "fp64-curves":
        return (work - curves) / rate["fp32"] + curves / rate["fp64"]
    return work / rate[unit]


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def measured_stages(model, tokenizer) -> dict[str, tuple[float, float]]:
    """(seconds, peak RSS growth in GiB) of every stage on `model`."""
    results = {}

    def stage(name: str, run: Callable[[], object]) -> object:
        before = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS, VmHWM (Linux)
        started = time.perf_counter()
        value = run()
        seconds = time.perf_counter() - started
        results[name] = (seconds, (status_kib("VmHWM") - before) / 2**20)
        print(f"{name}: {seconds:.1f} s")
        return value

    layers = range(len(decoder_layers(model)))
    pools = ["wiki", "news", "plays"]
    ids, addresses = candidate_pool(tokenizer, pools, POOL_WINDOWS // len(pools), SEQ_LEN, 0)
    key = cache_key(
        "bench", model, CandidatePool(pools, POOL_WINDOWS // len(pools), SEQ_LEN, 0), layers, activations=True
    )
    stage("activation cache", lambda: build_cache(model, key, ids, addresses, progress=False))
    refit_ids = calibration_samples(tokenizer, f"wiki:{REFIT_WINDOWS}", SEQ_LEN, 0).input_ids
    outputs = output_projections(model, layers)
    moments = stage(
        "refit pool",
        lambda: collect_input_moments(
            model, prunable_linears(model, layers) | outputs, refit_ids, False, 8, False, outputs
        ),
    )
    fisher = stage("output Fisher", lambda: collect_output_fisher(model, outputs, refit_ids[:LOSS_WINDOWS], False))
    pool = RefitPool("wiki:256", SEQ_LEN, 0, refit_ids.numel(), moments, fisher)
    val = pool_windows(tokenizer, "wiki", SEQ_LEN, "val")[:VAL_WINDOWS]
    scorer = ValidationScorer(model, val, 0, "float32")
    kept = {}
    for name, metric, rule in (("trial (uniform)", "act", "uniform"), ("trial (loss)", "fluct", "loss")):
        spec = recipe_prune_options("best", target_params=0.2).spec.with_(metric=metric, allocation=rule)

        def trial(spec=spec):
            plan = plan_allocation(model, pool.importance(model, spec), spec)
            updates = refit_updates(model, plan, pool, spec.compensation, spec.damp)
            scorer.score(plan, None, updates)
            return plan, updates

        kept[name] = stage(name, trial)

    def prune_and_save():
        pruned = copy.deepcopy(model)
        cut(pruned, *kept["trial (loss)"])
        with tempfile.TemporaryDirectory() as folder:
            save_pruned(pruned, tokenizer, Path(folder) / "m")

    stage("prune + save", prune_and_save)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2", choices=("smollm2",), help="measured shapes (tinyllama-1b next)")
    parser.add_argument("--efficiency", type=float, default=0.5, help="share of H100 peak the projection assumes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or "bench/results/stage_cost.json")

    model, tokenizer = load_shape(args.shape, torch.device("cpu"), torch.float32)
    shape = shape_of(model)
    rate = rates()
    measured = measured_stages(model, tokenizer)
    work = stage_work(shape, 4)  # fp32 on this CPU
    curves = sum(n**3 / 3 + 2 * o * n * n for o, n in shape.outputs())
    rows, stages = [], {}
    for name, (units, unit) in work.items():
        seconds, peak = measured[name]
        model_seconds = modelled(units, unit, rate, "fp32", curves)
        stages[name] = {
            "seconds": seconds,
            "modelled_seconds": model_seconds,
            "peak_rss_gib": peak,
            "work": units,
            "unit": unit,
        }
        rows.append([name, f"{seconds:.1f}", f"{model_seconds:.1f}", f"{seconds / model_seconds:.2f}", f"{peak:.2f}"])
    print(format_table(["stage", "measured s", "modelled s", "measured / modelled", "peak RSS +GiB"], rows))

    projections = {}
    for name, dims in PROJECTED.items():
        big = Shape(*dims)
        h100 = {k: v * (args.efficiency if k not in ("bandwidth", "disk") else 1) for k, v in H100.items()}
        big_curves = sum(n**3 / 3 + 2 * o * n * n for o, n in big.outputs())
        seconds = {s: modelled(u, t, h100, "bf16", big_curves) for s, (u, t) in stage_work(big, 2).items()}
        once = sum(seconds[s] for s in ("activation cache", "refit pool", "output Fisher"))
        search = once + 20 * seconds["trial (uniform)"] + 10 * seconds["trial (loss)"]
        projections[name] = {"stages": seconds, "search_30_trials_seconds": search}
        print(
            f"{name} on one H100 at {args.efficiency:.0%} of peak: "
            + ", ".join(f"{s} {v:.1f} s" for s, v in seconds.items())
            + f"; a 30-trial default search {search / 60:.1f} min"
        )
    result = {
        "machine": device_name(torch.device("cpu")),
        "shape": asdict(shape),
        "rates": rate,
        "stages": stages,
        "h100": H100,
        "efficiency": args.efficiency,
        "projections": projections,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
