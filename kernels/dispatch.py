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
        return tensor.is_cuda and triton_installed()
    return backend == "triton"
