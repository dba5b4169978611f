"""`adapruner export` as a library call: checks → load → GGUF file for llama.cpp."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from adapruner.devices import Placement
from adapruner.errors import AdaPrunerError
from adapruner.model.models import load_placed
from adapruner.output.export import OUTTYPES, export_gguf
from adapruner.staging import check_writable


def export_model(model_name: str, out: str | Path, outtype: str = "f32", placement: Placement | None = None) -> dict:
    """Export `model_name` (a saved pruned directory, a stock HF directory, a hub id or `smollm2`) to the new GGUF
    file `out`; returns what was written. Bad arguments are one-line errors before the model loads."""
    out = Path(out)
    if outtype not in OUTTYPES:
        raise AdaPrunerError(f"unknown --outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    if out.exists():
        raise AdaPrunerError(f"output {out} already exists: pass a new --gguf path or remove it")
    if out.suffix != ".gguf":
        raise AdaPrunerError(f"--gguf {out}: name the file *.gguf")
    check_writable(out, "--gguf")
    placement = placement or Placement.of("cpu", "float32")
    model, tokenizer = load_placed(model_name, replace(placement, device=torch.device("cpu")))  # written from host
    export_gguf(model, tokenizer, out, outtype)
    return {"model": model_name, "gguf": str(out), "outtype": outtype, "bytes": out.stat().st_size}
