"""`adapruner export` as a library call: checks → load → GGUF file for llama.cpp."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from adapruner.data.calibration import DEFAULT_SEQ_LEN, calibration_samples, parse_calib_spec
from adapruner.data.corpora import check_pool
from adapruner.devices import Placement
from adapruner.errors import AdaPrunerError
from adapruner.model.models import load_placed
from adapruner.output.export import OUTTYPES, export_gguf
from adapruner.output.modelfile import write_modelfile
from adapruner.output.quantize import QUANT_TYPES, check_quantizer, fallback_summary
from adapruner.staging import check_writable


def export_model(
    model_name: str,
    out: str | Path,
    outtype: str = "f32",
    placement: Placement | None = None,
    imatrix: str | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> dict:
    """Export `model_name` (a saved pruned directory, a stock HF directory, a hub id or `smollm2`) to the new GGUF
    file `out` and its ollama Modelfile beside it (`out` with the suffix .Modelfile); a quantized `outtype` weighs its
    rounding by the importance matrix of the calibration windows `imatrix` (e.g. "wiki:32", windows of `seq_len`
    tokens) where given. Returns what was written, with the tensors that fell back from a K-quant. Bad arguments are
    one-line errors before the model loads."""
    out = Path(out)
    if outtype not in (*OUTTYPES, *QUANT_TYPES):
        raise AdaPrunerError(f"unknown --outtype {outtype!r}: use one of {', '.join((*OUTTYPES, *QUANT_TYPES))}")
    if imatrix is not None:
        if outtype not in QUANT_TYPES:
            raise AdaPrunerError(f"--imatrix weighs llama.cpp's quantizer: pass a quantized --outtype, not {outtype}")
        for pool, _count in parse_calib_spec(imatrix):
            check_pool(pool)
    modelfile = out.with_suffix(".Modelfile")
    for path in (out, modelfile):
        if path.exists():
            raise AdaPrunerError(f"output {path} already exists: pass a new --gguf path or remove it")
    if out.suffix != ".gguf":
        raise AdaPrunerError(f"--gguf {out}: name the file *.gguf")
    check_writable(out, "--gguf")
    check_quantizer(outtype)
    placement = placement or Placement.of("cpu", "float32")
    model, tokenizer = load_placed(model_name, replace(placement, device=torch.device("cpu")))  # written from host
    windows = None if imatrix is None else calibration_samples(tokenizer, imatrix, seq_len).input_ids
    fallbacks = export_gguf(model, tokenizer, out, outtype, windows)
    try:
        write_modelfile(modelfile, out, tokenizer)
    except BaseException:
        out.unlink(missing_ok=True)  # the pair appears whole or not at all
        raise
    return {
        "model": model_name,
        "gguf": str(out),
        "modelfile": str(modelfile),
        "outtype": outtype,
        "imatrix": imatrix,
        "bytes": out.stat().st_size,
        "fallbacks": [{"tensor": f.name, "width": f.width, "type": f.got} for f in fallbacks],
        "fallback_summary": fallback_summary(fallbacks),
    }
