"""Where models run and in which weight dtype: `--device` and `--dtype`, resolved in this one place.

    --device auto   CUDA (device 0) when torch sees one, else the CPU;  cpu | cuda | cuda:N name one
    --dtype  auto   bfloat16 weights on CUDA (float16 where the card has no bf16), float32 on the CPU
Importance and statistics accumulate in fp32 whatever the weight dtype (the kernels and hooks upcast).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from adapruner.errors import AdaPrunerError

if TYPE_CHECKING:
    from adapruner.model.big_model import Dispatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu; a CUDA device that is not there is a one-line error."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise AdaPrunerError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AdaPrunerError(f"--device {name}: torch sees no CUDA device here: pass --device cpu (or auto)")
        if (device.index or 0) >= torch.cuda.device_count():
            raise AdaPrunerError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible: "
                f"pass cuda:0 … cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on CUDA (float16 without bf16 support), float32 elsewhere; other names as written."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise AdaPrunerError(f"unknown --dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Placement:
    """How a command loads its model: a resolved device and weight dtype, and whether Python code shipped with the
    model may run (`trust_remote_code`, off unless asked). `Placement.of("auto", "auto")` is every command's default."""

    device: torch.device
    dtype: torch.dtype
    trust_remote_code: bool = False
    dispatch: Dispatch | None = None  # spread over devices, host memory and disk (`adapruner.model.big_model`)

    @classmethod
    def of(
        cls,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        dispatch: Dispatch | None = None,
    ) -> Placement:
        """With a `dispatch`, `device` stays `auto` and names the first device (cuda:0 where CUDA is, else the CPU)."""
        if dispatch is not None and device != "auto":
            raise AdaPrunerError(f"--device {device} and --device-map both place the model: pass one of them")
        resolved = resolve_device(device)
        return cls(resolved, resolve_dtype(dtype, resolved), trust_remote_code, dispatch)

    def describe(self) -> dict:
        described = {"device": str(self.device), "dtype": dtype_name(self.dtype)}
        return described if self.dispatch is None else described | self.dispatch.describe()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go (every tensor a model step creates goes there): the execution device of its input
    embeddings — a dispatched model's first device — else the device of its first parameter."""
    from adapruner.model.big_model import execution_device

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings) if embeddings is not None else next(model.parameters()).device


@contextmanager
def device_errors():
    """Turn running out of memory into a one-line error that names the fixes; other errors pass through."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:  # torch.OutOfMemoryError in newer torch is the same class
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "out of memory"
        raise AdaPrunerError(
            f"out of device memory ({first}): lower --batch-size, lower --cache-mem, or pass --device cpu"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if "can't allocate memory" in text or "DefaultCPUAllocator" in text:
            raise AdaPrunerError(
                "out of host memory: lower --batch-size or --cache-mem, or use a smaller --pool-size"
            ) from None
        raise
