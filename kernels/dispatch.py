"""When the Triton kernels run: on CUDA tensors, or anywhere under `TRITON_INTERPRET=1` when asked explicitly."""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor, backend: Backend) -> bool:
    """`auto`: Triton for CUDA tensors when triton is installed, else torch; `triton`/`torch` force a path."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}: use auto, triton or torch")
    if backend == "auto":
        return triton_runs_on(tensor.device)
    return backend == "triton"


def triton_runs_on(device: torch.device) -> bool:
    """The `auto` rule: compiled Triton kernels run on CUDA devices, when triton is installed."""
    return device.type == "cuda" and triton_installed()


def kernel_backend(device: torch.device) -> str:
    """Which implementation `auto` dispatch runs for tensors on `device`: `triton` or `torch` (for reports)."""
    return "triton" if triton_runs_on(device) else "torch"


def scoring_backend(device: torch.device, cache_dtype: str) -> str:
    """The cached-gradient importance path `auto` takes on `device` for a cache stored in `cache_dtype`."""
    if kernel_backend(device) == "triton":
        return "triton"
    return "torch-bf16-cpu" if device.type == "cpu" and cache_dtype == "bfloat16" and native_bf16(device) else "torch"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (faster than fp32) on `device`: CUDA with bf16,
    CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch's CPU feature probes are private; without them, assume no
        probes = (
            getattr(torch.cpu, "_is_avx512_bf16_supported", None),
            getattr(torch.cpu, "_is_amx_tile_supported", None),
        )
        return any(probe is not None and probe() for probe in probes)
    return False
