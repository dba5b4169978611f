"""Every stage of the default search costed: `python -m bench.stage_cost [--shape smollm2|tinyllama-1b]` (issue 34).

The default recipe (`best`: act/fluct × uniform/global/loss, lsq refit, all scored and refit on the 256-window wiki
refit pool) in fp32, stage by stage, each measured on this machine and modelled. On SmolLM2-135M (real text) with the
search's window counts; on the tinyllama-1b shape (random weights, seeded random token ids) with fewer windows (24 /
32 / 16 / 4 instead of 96 / 256 / 64 / 16), so that it runs in minutes here — the model is given the same counts:
  activation cache  one forward+backward over the candidate pool (3 pools × 32 windows), X and dY stored; per
                    prunable linear its hooks form dY·W and every window's gradient dYₛᵀXₛ (X·Wᵀ is the forward's
                    own output, kept): two GEMMs of the forward's size more;
  refit pool        one forward over the refit windows, the output projections' Grams summed (2·in²·T);
  output Fisher     over its first 64 windows, a forward recording each layer's input, then layer by layer from the
                    top a forward again and its backward (`collect.layer_gradients`): two forwards and a backward;
  trial (uniform)   act scores, the uniform counts, the lsq refit (a solve per output projection), the validation
                    forward of the pruned model over 16 windows;
  trial (loss)      fluct scores, the loss allocation's curves (per output projection a Cholesky, n³/3, and one
                    product, 2·out·n², in fp32), then as above;
  prune + save      the loss trial's plan cut from a copy and saved.
Model: FLOPs / this machine's GEMM rate in the stage's dtype; bytes / its copy rate into fresh memory (the model
read and written twice, page faults included) plus its sustained file write rate (all measured in the run, `rates`).
A forward over T tokens costs 2·(linear weights)·T + 2·hidden·vocab·T + 4·T·S·hidden per layer (attention over
windows of S tokens), a backward twice that. Printed per stage: measured and modelled seconds, their ratio, and the
peak RSS growth over the RSS before the stage (heap freed earlier is reused). Then the same model projected to the
Llama-3.1-8B and -70B shapes on one H100 (989 TFLOP/s bf16 and 67 TFLOP/s fp32 at `--efficiency` of peak, 3.35 TB/s;
2 GB/s to disk): a 30-trial search of distinct trials (a third `loss`), and the default space's distinct
configurations (`distinct_trials`: what a default search of any length runs). Writes
bench/results/stage_cost.json.
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
from transformers import AutoTokenizer

from adapruner.choosing.selection import plan_allocation
from adapruner.cutting.compensation import refit_updates
from adapruner.cutting.removal import cut
from adapruner.data.calibration import calibration_samples, pool_windows
from adapruner.model.models import load_shapes, model_path
from adapruner.model.structure import decoder_layers, output_projections, prunable_linears
from adapruner.output.report import format_table
from adapruner.output.saving import save_pruned
from adapruner.recipes import recipe_prune_options, search_recipe
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key, candidate_pool
from adapruner.scoring.collect import LOSS_WINDOWS, collect_input_moments, collect_output_fisher
from adapruner.scoring.metrics import metric as registered_metric
from adapruner.scoring.refit_pool import RefitPool
from adapruner.searching.trial_scorer import ValidationScorer
from bench.shapes import RANDOM_SHAPES, bench_windows, load_shape
from bench.timing import device_name

SEQ_LEN = 128
DISK_PROBE_BYTES = 2**30
# fresh: HBM bandwidth (torch's caching allocator hands out device memory already mapped); disk: an NVMe SSD
H100 = {"bf16": 989e12, "fp32": 67e12, "fresh": 3.35e12, "disk": 2e9}
FLOP_RATES = ("bf16", "fp32")  # the rates `--efficiency` scales
PROJECTED = {"llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256), "llama-3.1-70b": (8192, 80, 64, 8, 28672, 128256)}


@dataclass(frozen=True)
class Windows:
    """Window counts of the stages: candidate pool, refit pool, output Fisher, validation."""

    pool: int = 96
    refit: int = 256
    fisher: int = LOSS_WINDOWS
    val: int = 16


SEARCH_WINDOWS = Windows()  # the default search's
MEASURED_WINDOWS = {"smollm2": SEARCH_WINDOWS, "tinyllama-1b": Windows(24, 32, 16, 4)}


@dataclass(frozen=True)
class Shape:
    """What the cost model reads of a decoder: hidden, layers, heads, kv heads, MLP width, vocabulary, and whether the
    output head is the embedding (tied)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linear_params(self) -> int:
        """Weights of one decoder layer's linears."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.intermediate

    def model_bytes(self, element: int, kept: float = 1.0) -> int:
        """Bytes of the weights at `element` bytes each, `kept` of the decoder layers' linears left."""
        embeddings = (1 if self.tied else 2) * self.hidden * self.vocab
        return round(element * (kept * self.layers * self.linear_params + embeddings))

    def forward(self, windows: int, kept: float = 1.0) -> float:
        """FLOPs of a forward over `windows` windows of SEQ_LEN tokens (`kept`: the share of layer weights left)."""
        tokens = windows * SEQ_LEN
        attention = 4 * tokens * SEQ_LEN * self.hidden * self.layers
        return kept * self.linear_forward(windows) + 2 * self.hidden * self.vocab * tokens + attention

    def linear_forward(self, windows: int) -> float:
        """FLOPs of the decoder layers' linears over `windows` windows."""
        return 2 * self.layers * self.linear_params * windows * SEQ_LEN

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
        bool(c.tie_word_embeddings),
    )


def stage_work(
    shape: Shape, element: int, windows: Windows = SEARCH_WINDOWS, removed: float = 0.2
) -> dict[str, dict[str, float]]:
    """Work per stage by where it runs: FLOPs in the model's dtype ("model"), in fp32 (the hooks', solves' and loss
    curves' own arithmetic); bytes copied into fresh memory ("fresh") and written to a file ("file"), for
    weights of `element` bytes."""
    grams = sum(2 * n * n for _out, n in shape.outputs()) * windows.refit * SEQ_LEN
    kept = 1 - removed
    solves = sum(  # W_R Σ_RK, the Cholesky of Σ_KK + λI, two triangular solves (`compensation.compensated`)
        2 * out * removed * n * kept * n + (kept * n) ** 3 / 3 + 2 * (kept * n) ** 2 * out for out, n in shape.outputs()
    )
    curves = sum(n**3 / 3 + 2 * out * n * n for out, n in shape.outputs())
    trial = {"model": shape.forward(windows.val, kept), "fp32": solves}
    return {
        "activation cache": {"model": 3 * shape.forward(windows.pool), "fp32": 2 * shape.linear_forward(windows.pool)},
        "refit pool": {"model": shape.forward(windows.refit), "fp32": grams},
        "output Fisher": {"model": 4 * shape.forward(windows.fisher)},
        "trial (uniform)": trial,
        "trial (loss)": trial | {"fp32": solves + curves},
        "prune + save": {  # the dense model copied, the pruned one cut from it (both into fresh memory), its file
            "fresh": 2 * shape.model_bytes(element) + 2 * shape.model_bytes(element, kept),
            "file": shape.model_bytes(element, kept),
        },
    }


def distinct_trials(recipe_name: str = "best") -> tuple[int, int]:
    """(uniform/global, loss) configurations in the recipe's search space: metric × aggregation (one for a metric of
    the output projections' columns alone) × allocation. A trial whose parameters an earlier trial had returns that
    trial's score without running (`searching.search.Objective`), so a search of any length runs at most these."""
    space = search_recipe(recipe_name)
    per_allocation = sum(
        1 if registered_metric(m).columns_only else len(space["aggregations"]) for m in space["metrics"]
    )
    losses = sum(per_allocation for a in space["allocations"] if a == "loss")
    return per_allocation * len(space["allocations"]) - losses, losses


def rates() -> dict[str, float]:
    """This machine's GEMM FLOP/s in fp32 (1024 × 1536 @ 1536², the best of 5 rounds), its copy rate into a fresh
    allocation ("fresh": each 128 MiB copy into a new tensor, whose pages fault in on first touch, as a model copy's
    and a cut's do) and its sustained file write rate ("disk": 1 GiB written and synced; a small write only fills
    the page cache), in bytes/s, measured now (before and after the stages: the higher of the two)."""
    measured = {}
    a, b = torch.randn(1024, 1536), torch.randn(1536, 1536)
    a @ b
    best = float("inf")
    for _ in range(5):  # the best of 5 rounds: this machine is shared and noisy
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, time.perf_counter() - started)
    measured["fp32"] = 10 * 2 * 1024 * 1536 * 1536 / best
    data = torch.randn(32 * 2**20)
    started = time.perf_counter()
    for _ in range(5):
        torch.empty_like(data).copy_(data)  # 128 MiB: above malloc's mmap threshold, so new pages every time
    measured["fresh"] = 5 * 2 * data.numel() * 4 / (time.perf_counter() - started)
    payload = data.numpy().tobytes()
    with tempfile.NamedTemporaryFile() as file:  # 1 GiB, synced: the sustained rate a model-sized save meets
        started = time.perf_counter()
        for _ in range(DISK_PROBE_BYTES // len(payload)):
            file.write(payload)
        file.flush()
        os.fsync(file.fileno())
        measured["disk"] = DISK_PROBE_BYTES / (time.perf_counter() - started)
    return measured


def modelled(work: dict[str, float], rate: dict[str, float], model_dtype: str) -> float:
    """Seconds of `work` (`stage_work`) at `rate`s: FLOPs in the model's dtype at `rate[model_dtype]`, bytes copied
    into fresh memory at the fresh-copy rate, bytes written to a file at the disk rate."""
    kinds = {"model": model_dtype, "file": "disk"}
    return sum(amount / rate[kinds.get(kind, kind)] for kind, amount in work.items())


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def stage_windows(
    shape_name: str, tokenizer, windows: Windows
) -> tuple[torch.Tensor, list, torch.Tensor, torch.Tensor]:
    """(candidate-pool ids, their addresses, refit ids, validation ids): the search's text for smollm2; seeded random
    token ids for a random-weight shape."""
    if tokenizer is not None:
        pools = ["wiki", "news", "plays"]
        ids, addresses = candidate_pool(tokenizer, pools, windows.pool // len(pools), SEQ_LEN, 0)
        refit = calibration_samples(tokenizer, f"wiki:{windows.refit}", SEQ_LEN, 0).input_ids
        return ids, addresses, refit, pool_windows(tokenizer, "wiki", SEQ_LEN, "val")[: windows.val]
    ids, addresses, rest = bench_windows(shape_name, None, [], windows.pool, SEQ_LEN, windows.refit + windows.val)
    return ids, addresses, rest[: windows.refit], rest[windows.refit :]


def measured_stages(model, tokenizer, shape_name: str, windows: Windows) -> dict[str, tuple[float, float]]:
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
    ids, addresses, refit_ids, val = stage_windows(shape_name, tokenizer, windows)
    pools = sorted({pool for pool, _index in addresses})
    key = cache_key("bench", model, CandidatePool(pools, ids.shape[0] // len(pools), SEQ_LEN, 0), layers, True)
    stage("activation cache", lambda: build_cache(model, key, ids, addresses, progress=False))
    outputs = output_projections(model, layers)
    moments = stage(
        "refit pool",
        lambda: collect_input_moments(
            model, prunable_linears(model, layers) | outputs, refit_ids, False, 8, False, outputs
        ),
    )
    fisher = stage("output Fisher", lambda: collect_output_fisher(model, outputs, refit_ids[: windows.fisher], False))
    pool = RefitPool(f"{pools[0]}:{windows.refit}", SEQ_LEN, 0, refit_ids.numel(), moments, fisher)
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
    saved_tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path("smollm2"))  # a random shape's files

    def prune_and_save():
        pruned = copy.deepcopy(model)
        cut(pruned, *kept["trial (loss)"])
        with tempfile.TemporaryDirectory() as folder:
            save_pruned(pruned, saved_tokenizer, Path(folder) / "m")

    stage("prune + save", prune_and_save)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2", choices=tuple(MEASURED_WINDOWS), help="the measured model")
    parser.add_argument("--efficiency", type=float, default=0.5, help="share of H100 peak the projection assumes")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--remodel", action="store_true", help="model and project again the run in --out (its measurements kept)"
    )
    args = parser.parse_args()
    suffix = "" if args.shape == "smollm2" else f"-{args.shape}"
    out = Path(args.out or f"bench/results/stage_cost{suffix}.json")
    windows = MEASURED_WINDOWS[args.shape]

    if args.remodel:
        run = json.loads(out.read_text())
        rate = run["rates"]
        if "fresh" not in rate:
            raise SystemExit(f"{out} predates the fresh-copy rate: run it again without --remodel")
        shape = shape_of(load_shapes("smollm2")) if args.shape == "smollm2" else Shape(*RANDOM_SHAPES[args.shape])
        measured = {name: (stage["seconds"], stage["peak_rss_gib"]) for name, stage in run["stages"].items()}
    else:
        model, tokenizer = load_shape(args.shape, torch.device("cpu"), torch.float32)
        shape = shape_of(model)
        before = rates()
        measured = measured_stages(model, tokenizer, args.shape, windows)
        rate = {kind: max(value, before[kind]) for kind, value in rates().items()}  # load only lowers a rate
    work = stage_work(shape, 4, windows)  # fp32 on this CPU
    rows, stages = [], {}
    for name, units in work.items():
        seconds, peak = measured[name]
        model_seconds = modelled(units, rate, "fp32")
        stages[name] = {"seconds": seconds, "modelled_seconds": model_seconds, "peak_rss_gib": peak, "work": units}
        rows.append([name, f"{seconds:.1f}", f"{model_seconds:.1f}", f"{seconds / model_seconds:.2f}", f"{peak:.2f}"])
    print(format_table(["stage", "measured s", "modelled s", "measured / modelled", "peak RSS +GiB"], rows))

    projections = {}
    for name, dims in PROJECTED.items():
        big = Shape(*dims)
        h100 = {k: v * (args.efficiency if k in FLOP_RATES else 1) for k, v in H100.items()}
        seconds = {stage: modelled(units, h100, "bf16") for stage, units in stage_work(big, 2).items()}
        once = sum(seconds[s] for s in ("activation cache", "refit pool", "output Fisher"))
        search = once + 20 * seconds["trial (uniform)"] + 10 * seconds["trial (loss)"]
        others, losses = distinct_trials()
        default = once + others * seconds["trial (uniform)"] + losses * seconds["trial (loss)"]
        projections[name] = {
            "stages": seconds,
            "search_30_trials_seconds": search,
            "default_space_seconds": default,
            "default_space_trials": {"uniform/global": others, "loss": losses},
        }
        print(
            f"{name} on one H100 at {args.efficiency:.0%} of peak: "
            + ", ".join(f"{s} {v:.1f} s" for s, v in seconds.items())
            + f"; 30 distinct trials {search / 60:.1f} min; the default space's {others + losses} configurations, "
            f"what any number of its trials runs, {default / 60:.1f} min"
        )
    result = {
        "machine": device_name(torch.device("cpu")),
        "shape": asdict(shape),
        "shape_name": args.shape,
        "windows": asdict(windows),
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
