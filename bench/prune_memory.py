"""`prune`'s peak memory against its plan: `python -m bench.prune_memory [--shape tinyllama-1b] [--calib wiki:32]`.

For a shape (`smollm2`: the real model; a `bench/shapes.py` random shape: its widths and depth with SmolLM2's
vocabulary, so that its tokenizer reads real text — saved once, fp32, to a temporary directory), prints `prune
--memory-plan` and then runs `adapruner prune` with the best recipe at `--target-params` on this CPU in a child
process, whose peak resident memory (ru_maxrss, os.wait4) is compared with the plan's peak. The interpreter and its
libraries are not in the plan: a child that only imports them is measured too and subtracted (a child's peak counts
the pages of the parent it forked from, so the parent never holds the model: a grandchild builds and saves it). Writes
bench/results/prune_memory-<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from adapruner.commands.prune import prune_memory_plan_of
from adapruner.cutting.pruning import PruneOptions
from adapruner.devices import Placement
from adapruner.model.models import model_path
from adapruner.recipes import recipe_prune_options
from adapruner.searching.memory_plan import GIB
from bench.shapes import SHAPES, random_llama
from bench.timing import device_name

IMPORTS = "import torch, transformers, adapruner.cli, adapruner.commands.prune"


def peak_rss_bytes(command: list[str]) -> int:
    """The peak resident memory of `command` run to its end (it must succeed)."""
    child = subprocess.Popen(command)
    _pid, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return usage.ru_maxrss * 1024  # KiB on Linux


def save_random_model(shape: str, folder: str | Path) -> None:
    """A random-weight model of `shape` with SmolLM2's vocabulary and tokenizer, saved to `folder` (fp32)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path("smollm2"))
    random_llama(shape, torch.device("cpu"), torch.float32, vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def saved_random_model(shape: str, folder: Path) -> str:
    """`save_random_model` in a child process: this one stays small, since a child's peak RSS counts the parent's
    pages it forked with."""
    code = f"from bench.prune_memory import save_random_model as save; save({shape!r}, {str(folder)!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tinyllama-1b", choices=SHAPES)
    parser.add_argument("--calib", default="wiki:32", help="calibration windows (the plan does not depend on them)")
    parser.add_argument("--target-params", default="0.2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = "smollm2" if args.shape == "smollm2" else saved_random_model(args.shape, Path(folder) / "model")
        options = recipe_prune_options("best", target_params=float(args.target_params))
        options = PruneOptions(options.spec, calib=args.calib)
        plan = prune_memory_plan_of(model, options, Placement.of("cpu", "float32"))
        print(plan.table())
        base = peak_rss_bytes([sys.executable, "-c", IMPORTS])
        command = [sys.executable, "-m", "adapruner", "prune", "--model", model, "--out", f"{folder}/out"]
        command += ["--target-params", args.target_params, "--calib", args.calib, "--no-eval"]
        command += ["--device", "cpu", "--dtype", "float32"]
        peak = peak_rss_bytes(command)
    pruning = peak - base
    print(
        f"{args.shape}: prune's peak RSS {peak / GIB:.2f} GiB, the interpreter and libraries {base / GIB:.2f} GiB: "
        f"pruning {pruning / GIB:.2f} GiB against the plan's {plan.peak_bytes / GIB:.2f} GiB "
        f"(measured / planned {pruning / plan.peak_bytes:.2f}; weights {plan.model_bytes / GIB:.2f} GiB)"
    )
    out = Path(f"bench/results/prune_memory-{args.shape}.json")
    result = {
        "machine": device_name(torch.device("cpu")),
        "shape": args.shape,
        "calib": args.calib,
        "target_params": float(args.target_params),
        "peak_rss_bytes": peak,
        "interpreter_bytes": base,
        "pruning_bytes": pruning,
        "plan": {"model_bytes": plan.model_bytes, "peak_bytes": plan.peak_bytes}
        | {phase.name: phase.bytes for phase in plan.phases},
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
