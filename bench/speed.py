"""Inference speed of dense and pruned models (20% of the parameters removed) in transformers and, exported to
GGUF, in llama.cpp — tokens/s and the pruned/dense ratio of each, beside the ideal ratio dense/pruned parameters.

    python -m bench.speed [--shapes smollm2,tinyllama-1b] [--target 0.2] [--align 1]

Rows per shape and runtime: prefill tokens/s at batch 1 (and 8 in transformers; llama-cpp-python evaluates one
sequence) over 512 tokens, decode tokens/s at batch 1 over 128 new tokens with the KV cache, each the median of
`--repeats` runs after a warm-up, on this machine's CPU in fp32 (f32 GGUF). Each shape's rows come from one run; the
results file keeps the rows of (shape, align) pairs not measured this time. The pruned model comes from the `global`
allocation scored by `l2` (speed depends on the widths, not on which units were kept). Writes
bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from adapruner.choosing.allocation import count_params
from adapruner.choosing.selection import plan_allocation
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.removal import apply_plan
from adapruner.evaluation.speed import SpeedShape, measure_speed, median_seconds, speedups
from adapruner.output.export import export_gguf
from adapruner.scoring.importance import Importance
from bench.shapes import load_shape

RESULTS = Path(__file__).with_name("results") / "speed.json"


def filler_tokenizer(vocab: int):
    """A byte-level BPE tokenizer with `vocab` entries, for exporting a random-weight model (its text is unused)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["Ġ", *"abcdefghijklmnopqrstuvwxyz0123456789", "Ġa"]
    entries = {**{c: i for i, c in enumerate(chars)}, **{f"<x{i}>": i for i in range(len(chars), vocab)}}
    backend = Tokenizer(models.BPE(vocab=entries, merges=[("Ġ", "a")]))  # llama.cpp wants at least one merge
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=f"<x{vocab - 1}>")


def llama_cpp_speed(path: Path, shape: SpeedShape, vocab: int, threads: int) -> dict[str, float]:
    """Prefill (batch 1) and decode tokens/s of a GGUF file in llama.cpp, timed like `adapruner.evaluation.speed`."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=shape.prefill_len + shape.new_tokens,
        n_batch=shape.prefill_len,
        n_threads=threads,
        verbose=False,
    )
    rng = np.random.default_rng(0)
    window = rng.integers(0, vocab, shape.prefill_len).tolist()
    prompt = window[: shape.prompt_len]

    def prefill():
        llm.reset()
        llm.eval(window)

    def decode():
        llm.reset()
        llm.eval(prompt)
        for _ in range(shape.new_tokens - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    return {
        "prefill_b1_tok_s": shape.prefill_len / median_seconds(prefill, torch.device("cpu"), shape.repeats),
        "decode_b1_tok_s": shape.new_tokens / median_seconds(decode, torch.device("cpu"), shape.repeats),
    }


def bench_shape(name: str, args, shape: SpeedShape) -> list[dict]:
    model, tokenizer = load_shape(name, torch.device(args.device), getattr(torch, args.dtype))
    tokenizer = tokenizer or filler_tokenizer(model.get_input_embeddings().weight.shape[0])
    vocab = model.get_input_embeddings().weight.shape[0]
    rows, speeds = [], {}
    params = {"dense": count_params(model)}
    with tempfile.TemporaryDirectory() as folder:
        for variant in ("dense", "pruned"):
            if variant == "pruned":
                spec = PruneSpec(None, target_params=args.target, allocation="global", metric="l2", align=args.align)
                apply_plan(model, plan_allocation(model, Importance("l2"), spec))
                params["pruned"] = count_params(model)
            speeds[("transformers", variant)] = measure_speed(model, shape)
            if args.llama_cpp:
                gguf = Path(folder) / f"{variant}.gguf"
                export_gguf(model, tokenizer, gguf, "f32")
                speeds[("llama.cpp", variant)] = llama_cpp_speed(gguf, shape, vocab, torch.get_num_threads())
            print(f"{name} {variant}: {params[variant]:,} params", flush=True)
    for runtime in dict.fromkeys(runtime for runtime, _ in speeds):
        dense, pruned = speeds[(runtime, "dense")], speeds[(runtime, "pruned")]
        ratios = speedups(dense, pruned)
        for measure in dense:
            rows.append(
                {
                    "shape": name,
                    "runtime": runtime,
                    "measure": measure,
                    "dense": dense[measure],
                    "pruned": pruned[measure],
                    "speedup": ratios[measure],
                    "ideal": params["dense"] / params["pruned"],
                    "align": args.align,
                    "removed": 1 - params["pruned"] / params["dense"],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2,tinyllama-1b")
    parser.add_argument("--target", type=float, default=0.2, help="fraction of the parameters removed")
    parser.add_argument("--align", type=int, default=1, help="MLP widths kept in multiples of this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-batches", default="1", help="prefill batches for the 1B shape (batch 8 takes minutes)")
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    parser.add_argument("--device", default="cpu", help="where transformers runs (cuda in bench/gpu_check.sh)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON (rows of other runs in it are kept)")
    args = parser.parse_args()
    rows = []
    for name in args.shapes.split(","):
        batches = (1, 8) if name == "smollm2" else tuple(int(b) for b in args.large_batches.split(","))
        rows += bench_shape(name, args, SpeedShape(batches=batches, repeats=args.repeats))
    for row in rows:
        print(
            f"{row['shape']:>13} {row['runtime']:>12} {row['measure']:>18}: dense {row['dense']:9.1f}  "
            f"pruned {row['pruned']:9.1f}  speed-up {row['speedup']:.2f}x  (ideal {row['ideal']:.2f}x)"
        )
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name(torch.device(args.device))}, {args.dtype}"
    else:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, {args.dtype}"
    measured = {(row["shape"], row["align"]) for row in rows}  # rows of other (shape, align) runs are kept
    kept = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = [row for row in kept if (row["shape"], row["align"]) not in measured] + [
        {**row, "machine": machine} for row in rows
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out} ({machine})")


if __name__ == "__main__":
    main()
