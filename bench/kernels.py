"""Kernel throughput on LLaMA-7B shapes: `python -m bench.kernels [--device cuda] [--dtype bf16] [--sweep]`.

One row per (kernel, shape, provider ∈ triton / torch eager / torch.compile) with time, achieved GB/s (memory-bound
kernels) or TFLOP/s (the cached-gradient matmul), the fraction of a reference measured in the same run (device
copy bandwidth; torch's bf16 matmul throughput on the same shape) and the speed-up over torch eager. `triton` is
the product's default launch; `--sweep` adds rows `triton[...]` for other tile shapes (what the defaults were
chosen from). On CUDA a call's time is the median over ~100 ms of back-to-back calls timed with CUDA events
(`triton.testing.do_bench`), the CPU's launch cost included. Rows go to JSON (`--out`); `python -m
bench.plot_kernels` draws them. Without a CUDA device the Triton rows are skipped (they need a GPU; on CPU Triton
runs only in its slow interpreter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adapruner.kernels.cached_gradient import (
    cached_grad_importance_bf16_cpu,
    cached_grad_importance_torch,
    cached_grad_importance_triton,
)
from adapruner.kernels.channel_importance import channel_importance_torch, channel_importance_triton
from adapruner.kernels.dispatch import native_bf16
from adapruner.kernels.gather import gather_torch, gather_triton
from adapruner.output.report import format_table
from bench.timing import device_name, median_seconds

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# --sweep: other launches of each Triton kernel
ROW_SWEEP = [
    dict(block_c=c, block_k=k, num_warps=w) for c, k, w in ((1, 4096, 8), (2, 2048, 8), (8, 512, 4), (16, 256, 4))
]
COLUMN_SWEEP = [dict(block_c=c, block_k=k, num_warps=w) for c, k, w in ((64, 64, 4), (256, 16, 8), (32, 128, 4))]
GATHER_SWEEP = [
    dict(block_r=r, block_c=c, num_warps=w) for r, c, w in ((8, 512, 4), (32, 128, 4), (4, 1024, 4), (32, 256, 8))
]
CACHED_SWEEP = [
    dict(block_m=m, block_n=n, block_t=t, num_warps=w, num_stages=s)
    for m, n, t, w, s in (
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 64, 8, 4),
    )
]


def copy_bandwidth(device: torch.device, repeat: int, n_bytes: int = 1 << 28) -> float:
    """Device-to-device copy GB/s (read + write counted) on one large buffer."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = call_seconds(lambda: dst.copy_(src), device, repeat)
    return 2 * n_bytes / seconds / 1e9


def call_seconds(fn, device: torch.device, repeat: int) -> float:
    """Median seconds per call: CUDA events over back-to-back calls on a GPU, wall time per call on a CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return median_seconds(fn, device, repeat)


def providers(device: torch.device, torch_fn, triton_fn, use_compile: bool, sweep: list[dict] = ()):
    """(name, callable) for each provider available on this device; `sweep` adds Triton launches with other tiles."""
    rows = [("torch", torch_fn)]
    if use_compile:
        rows.append(("torch.compile", torch.compile(torch_fn, dynamic=False)))
    if device.type == "cuda":
        rows.append(("triton", triton_fn))
        rows += [
            (f"triton[{','.join(f'{k}={v}' for k, v in launch.items())}]", lambda launch=launch: triton_fn(**launch))
            for launch in sweep
        ]
    return rows


def bench_group_importance(device, dtype, shape, use_compile, repeat, dim, sweep):
    """taylor1 scores of rows (dim 0: q/k/v/gate/up) or columns (dim 1: o/down):
    reads W and G once, writes one fp32 vector."""
    w = torch.randn(shape, device=device, dtype=dtype)
    g = torch.randn(shape, device=device, dtype=dtype)
    n_bytes = 2 * w.numel() * w.element_size() + shape[dim] * 4
    kernel = f"group_importance(taylor1, {'rows' if dim == 0 else 'columns'})"
    out = []
    choices = providers(
        device,
        lambda: channel_importance_torch("taylor1", w, dim, g),
        lambda **launch: channel_importance_triton("taylor1", w, dim, g, **launch),
        use_compile,
        sweep,
    )
    for name, fn in choices:
        seconds = call_seconds(fn, device, repeat)
        out.append(
            {
                "kernel": kernel,
                "shape": list(shape),
                "provider": name,
                "seconds": seconds,
                "GB/s": n_bytes / seconds / 1e9,
            }
        )
    return out


def bench_gather(device, dtype, shape, use_compile, repeat, sweep):
    """Keep 75% of rows of one weight and 75% of columns of its transpose-shaped partner (a layer's cut)."""
    w_rows = torch.randn(shape, device=device, dtype=dtype)
    w_cols = torch.randn(shape[::-1], device=device, dtype=dtype)
    keep = torch.randperm(shape[0], device=device)[: 3 * shape[0] // 4].sort().values
    specs = [(w_rows, keep, None), (w_cols, None, keep)]
    n_bytes = 2 * 2 * keep.numel() * shape[1] * w_rows.element_size()  # read + write, two tensors
    out = []
    for name, fn in providers(
        device, lambda: gather_torch(specs), lambda **launch: gather_triton(specs, **launch), use_compile, sweep
    ):
        seconds = call_seconds(fn, device, repeat)
        out.append(
            {
                "kernel": "gather",
                "shape": list(shape),
                "provider": name,
                "seconds": seconds,
                "GB/s": n_bytes / seconds / 1e9,
            }
        )
    return out


def bench_cached_grad(device, dtype, shape, tokens, use_compile, repeat, sweep):
    """taylor1 from cached X (tokens × in), dY (tokens × out): 2·tokens·out·in FLOPs; torch materialises G."""
    out_f, in_f = shape
    w = torch.randn(shape, device=device, dtype=dtype)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    dy = torch.randn(tokens, out_f, device=device, dtype=dtype)
    rows = torch.arange(tokens, device=device)
    flops = 2 * tokens * out_f * in_f
    matmul_s = call_seconds(lambda: dy.t() @ x, device, repeat)
    out = []
    choices = providers(
        device,
        lambda: cached_grad_importance_torch("taylor1", w, x, dy, rows),
        lambda **launch: cached_grad_importance_triton("taylor1", w, x, dy, rows, **launch),
        use_compile,
        sweep,
    )
    if device.type == "cpu" and dtype == torch.bfloat16 and native_bf16(device):
        choices.append(("torch bf16 CPU path", lambda: cached_grad_importance_bf16_cpu("taylor1", w, x, dy, rows)))
    for name, fn in choices:
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            peak = torch.cuda.max_memory_allocated(device) - base
        seconds = call_seconds(fn, device, repeat)
        out.append(
            {
                "kernel": f"cached_grad_importance(taylor1, T={tokens})",
                "shape": list(shape),
                "provider": name,
                "seconds": seconds,
                "TFLOP/s": flops / seconds / 1e12,
                "matmul_TFLOP/s": flops / matmul_s / 1e12,
                "extra_bytes": peak,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, default=2048, help="cached token rows for the cached-gradient kernel")
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed calls per row on a CPU (on CUDA: ~100 ms of calls)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--sweep", action="store_true", help="also time other Triton tile shapes (GPU)")
    parser.add_argument("--shapes", default=";".join(f"{a}x{b}" for a, b in SHAPES))
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/kernels-<device>.json)")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(";")]
    bandwidth = copy_bandwidth(device, args.repeat)
    rows = []
    use_compile = not args.no_compile

    def sweep(configs: list[dict]) -> list[dict]:
        return configs if args.sweep else []

    for shape in shapes:
        rows += bench_group_importance(device, dtype, shape, use_compile, args.repeat, 0, sweep(ROW_SWEEP))
        rows += bench_group_importance(device, dtype, shape, use_compile, args.repeat, 1, sweep(COLUMN_SWEEP))
        rows += bench_gather(device, dtype, shape, use_compile, args.repeat, sweep(GATHER_SWEEP))
        rows += bench_cached_grad(device, dtype, shape, args.tokens, use_compile, args.repeat, sweep(CACHED_SWEEP))
    for row in rows:
        eager = next(
            r for r in rows if r["kernel"] == row["kernel"] and r["shape"] == row["shape"] and r["provider"] == "torch"
        )
        row["speedup_vs_eager"] = eager["seconds"] / row["seconds"]
        row["fraction"] = row["GB/s"] / bandwidth if "GB/s" in row else row["TFLOP/s"] / row["matmul_TFLOP/s"]
    name = device_name(device)
    print(f"device: {name}; copy bandwidth {bandwidth:.1f} GB/s; dtype {args.dtype}")
    if device.type != "cuda":
        print("triton rows need a CUDA GPU (on CPU Triton runs only in its interpreter); torch rows only")
    table = [
        [
            r["kernel"],
            "x".join(map(str, r["shape"])),
            r["provider"],
            r["seconds"] * 1e3,
            f"{r['GB/s']:.3g} GB/s" if "GB/s" in r else f"{r['TFLOP/s']:.3g} TFLOP/s",
            f"{r['fraction']:.2f}",
            f"{r['speedup_vs_eager']:.2f}x",
        ]
        for r in rows
    ]
    print(format_table(["kernel", "shape", "provider", "ms", "throughput", "of ref", "vs eager"], table))
    out = Path(args.out or f"bench/results/kernels-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": name, "dtype": args.dtype, "copy_GB/s": bandwidth, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
