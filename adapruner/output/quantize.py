"""Quantize a GGUF file with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`), and report which
tensors fell back from the requested block type.

K-quants (Q4_K, Q5_K, Q6_K, …) pack 256 values of a row into a super-block, so a tensor whose rows (its first GGUF
dimension, the input width) are not a multiple of 256 cannot take one: llama.cpp quantizes it to another type
(Q5_0, Q5_1, Q8_0, or F16 where not even 32 divides the row). A pruned width — the MLP channels `ffn_down` reads, the
heads × head_dim `attn_output` reads — is such a width unless `--align 256` (channels) keeps it a multiple.
"""

from __future__ import annotations

import ctypes
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapruner.errors import AdaPrunerError

QUANT_TYPES = ("q4_0", "q5_0", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")  # llama.cpp's ftypes
SUPER_BLOCK = 256  # values per K-quant super-block (llama.cpp's QK_K)
LLAMA_CPP_MISSING = (
    "--outtype {outtype} quantizes with llama.cpp: install llama-cpp-python (pip install 'adapruner[llamacpp]'), or "
    "pass --outtype f16/bf16/q8_0"
)


@dataclass(frozen=True)
class Fallback:
    """A tensor llama.cpp quantized to `got` instead of a K-quant, because its rows hold `width` values."""

    name: str
    width: int
    got: str


def check_quantizer(outtype: str) -> None:
    """A one-line error, before any model loads, where `outtype` needs llama-cpp-python and it is not installed."""
    import importlib.util

    if outtype in QUANT_TYPES and importlib.util.find_spec("llama_cpp") is None:
        raise AdaPrunerError(LLAMA_CPP_MISSING.format(outtype=outtype))


def quantize(
    source: Path, target: Path, outtype: str, imatrix: dict[str, np.ndarray] | None = None, threads: int = 0
) -> list[Fallback]:
    """Quantize the GGUF file `source` (f32) into `target` as llama.cpp's `outtype`, its rounding weighted by
    `imatrix` ({tensor name: mean squared input per column}, `adapruner.output.imatrix`) where given; returns the
    tensors that fell back from a K-quant (empty for the legacy Q4_0/Q5_0 types)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    params.nthread = threads
    entries, _held = _imatrix_entries(imatrix or {})
    if imatrix:
        params.imatrix = entries
    with _quiet_llama_cpp():
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0:
        raise AdaPrunerError(
            f"llama.cpp could not quantize the model to {outtype} (llama_model_quantize returned {code})"
        )
    return fallbacks(target) if "_k" in outtype else []


def _imatrix_entries(imatrix: dict[str, np.ndarray]) -> tuple:
    """llama.cpp's null-terminated array of {name, data, size}, and the arrays it points into (kept alive by the
    caller while the quantizer runs)."""
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the last one ends the array
    held = []
    for entry, (name, values) in zip(entries, imatrix.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        held.append((name.encode(), data))
        entry.name = held[-1][0]
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    return entries, held


def fallbacks(path: Path) -> list[Fallback]:
    """The 2-D tensors of the GGUF file `path` that llama.cpp did not give a K-quant, with their row widths: any other
    type, or Q8_0 on rows that are not whole super-blocks (llama.cpp keeps some whole-block tensors at Q8_0 by
    design, and Q6_K falls back to Q8_0)."""
    import gguf

    reader = gguf.GGUFReader(path)
    found = []
    for tensor in reader.tensors:
        kind, width = tensor.tensor_type.name, int(tensor.shape[0])
        if len(tensor.shape) == 2 and not kind.endswith("_K") and (kind != "Q8_0" or width % SUPER_BLOCK):
            found.append(Fallback(tensor.name, width, kind))
    return found


FALLBACK_KINDS = {  # a tensor name's end → what its rows hold, and what avoids the fallback
    "ffn_down.weight": ("MLP down projections", f" (--align {SUPER_BLOCK} keeps pruned MLP widths whole super-blocks)"),
    "attn_output.weight": ("attention output projections", " (their rows are heads × head_dim)"),
    "": ("tensors reading the hidden width", " (the model's own)"),
}


def fallback_summary(found: list[Fallback]) -> str:
    """One line per kind of width that fell back (`FALLBACK_KINDS`)."""
    kind_of = lambda name: next(end for end in FALLBACK_KINDS if name.endswith(end))  # noqa: E731
    lines = []
    for end, (what, remedy) in FALLBACK_KINDS.items():
        group = [f for f in found if kind_of(f.name) == end]
        if group:
            widths = _widths(sorted({f.width for f in group}))
            lines.append(
                f"{len(group)} {what} fell back from K-quants: rows of {widths} values, not multiples of "
                f"{SUPER_BLOCK}{remedy}"
            )
    return "\n".join(lines)


def _widths(widths: list[int]) -> str:
    shown = ", ".join(map(str, widths[:6]))
    return shown + (f", … ({len(widths)} widths)" if len(widths) > 6 else "")


@contextmanager
def _quiet_llama_cpp():
    """llama.cpp logs every tensor it converts through llama-cpp-python's logger: errors only, meanwhile."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
