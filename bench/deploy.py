"""SmolLM2 in llama.cpp as people run it: dense and pruned (the `best` recipe, 20% of the parameters removed, MLP
widths unaligned and aligned to 256), each exported in f16, Q8_0, Q6_K, Q5_K_M and Q4_K_M through llama.cpp's own
quantizer — file size, llama.cpp perplexity on the wiki evaluation windows, prefill and decode tokens/s.

    python -m bench.deploy [--target 0.2] [--windows 64] [--types f16,q8_0,q6_k,q5_k_m,q4_k_m]

Perplexity: every window evaluated from an empty context, the mean next-token NLL over all of them (transformers'
fp32 perplexity on the same windows beside it). Speed: prefill of 512 tokens and decode of 128 tokens at batch 1,
the median of 3 runs after a warm-up (`bench.speed.llama_cpp_speed`), this machine's CPU. Each K-quant row states how
many tensors fell back from K-quants (`adapruner.output.quantize`). Writes bench/results/deploy.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from adapruner.commands.eval import eval_windows
from adapruner.cutting.pruning import prune_model
from adapruner.evaluation.llama_cpp_ppl import llama_cpp_nll
from adapruner.evaluation.speed import SpeedShape
from adapruner.model.models import load_model
from adapruner.output.export import export_gguf
from adapruner.recipes import recipe_prune_options
from bench.speed import llama_cpp_speed

RESULTS = Path(__file__).with_name("results") / "deploy.json"


def gguf_nll(path: Path, windows: torch.Tensor, threads: int) -> float:
    """Mean next-token NLL of the GGUF model at `path` over `windows` in llama.cpp."""
    import llama_cpp

    n = windows.shape[1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n, n_batch=n, logits_all=True, verbose=False, n_threads=threads)
    return llama_cpp_nll(llm, windows)


def transformers_nll(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.cat([model(input_ids=windows[i : i + 8]).logits.float() for i in range(0, len(windows), 8)])
    logp = torch.log_softmax(logits[:, :-1], -1)
    return float(-logp.gather(2, windows[:, 1:, None]).mean())


def variants(args) -> dict:
    """{name: model}: the dense SmolLM2 and the `best` recipe's prunes at `args.target`, unaligned and aligned."""
    dense, tokenizer = load_model("smollm2")
    models = {"dense": dense}
    for align in args.aligns:
        model = copy.deepcopy(dense)
        options = recipe_prune_options("best", ratio=None, target_params=args.target)
        options = replace(options, spec=options.spec.with_(align=align), seq_len=args.seq_len)
        prune_model(model, tokenizer, options, progress=False)
        models[f"pruned {args.target:.0%}, align {align}"] = model
        print(f"pruned, align {align}", flush=True)
    return models, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.2, help="fraction of the parameters removed")
    parser.add_argument("--aligns", default="1,256", help="MLP widths kept in multiples of these, one prune each")
    parser.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m")
    parser.add_argument("--windows", type=int, default=64, help="wiki evaluation windows for perplexity")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.aligns = [int(a) for a in args.aligns.split(",")]
    threads = torch.get_num_threads()
    models, tokenizer = variants(args)
    windows = eval_windows(tokenizer, "wiki", args.seq_len, args.windows)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models.items():
            reference = float(np.exp(transformers_nll(model, windows)))
            params = sum(p.numel() for p in model.parameters())
            for outtype in args.types.split(","):
                path = Path(folder) / f"{len(rows)}.gguf"
                fallbacks = export_gguf(model, tokenizer, path, outtype)
                speed = llama_cpp_speed(path, SpeedShape(batches=(1,)), model.config.vocab_size, threads)
                rows.append(
                    {
                        "model": name,
                        "params": params,
                        "type": outtype,
                        "mib": path.stat().st_size / 2**20,
                        "ppl": float(np.exp(gguf_nll(path, windows, threads))),
                        "transformers_fp32_ppl": reference,
                        "fallbacks": len(fallbacks),
                        **speed,
                    }
                )
                path.unlink()
                row = rows[-1]
                print(
                    f"{name:>20} {outtype:>7}: {row['mib']:7.1f} MiB  ppl {row['ppl']:7.2f} (fp32 {reference:.2f})  "
                    f"prefill {row['prefill_b1_tok_s']:7.1f} tok/s  decode {row['decode_b1_tok_s']:6.1f} tok/s  "
                    f"fallbacks {row['fallbacks']}",
                    flush=True,
                )
    machine = f"{platform.machine()} CPU, {threads} threads, llama-cpp-python {_llama_cpp_version()}"
    setup = {"target": args.target, "windows": args.windows, "seq_len": args.seq_len, "recipe": "best"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out} ({machine})")


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


if __name__ == "__main__":
    main()
