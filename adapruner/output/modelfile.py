"""An ollama Modelfile beside an exported GGUF file, so that `ollama create NAME -f X.Modelfile` is one command.

FROM the GGUF file (a path relative to the Modelfile); the chat template where the tokenizer's is ChatML (SmolLM2,
Qwen: `<|im_start|>role ... <|im_end|>`), written in ollama's Go template syntax; for any other template ollama reads
the Jinja template the GGUF carries (`tokenizer.chat_template`), so none is written; a `stop` parameter for each
token that ends a turn (the tokenizer's end-of-sequence token, and ChatML's turn markers).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from adapruner.staging import staged_file

CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


def modelfile_text(gguf_name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Modelfile of the GGUF file `gguf_name` (in the same directory) for a model with `tokenizer`."""
    template = getattr(tokenizer, "chat_template", None) or ""
    chatml = all(marker in template for marker in CHATML_MARKERS)
    stops = [*CHATML_MARKERS] if chatml else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines = [f"FROM ./{gguf_name}"]
    if chatml:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
    elif template:
        lines.append("# TEMPLATE: ollama reads the chat template this GGUF file carries (tokenizer.chat_template)")
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_path: Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write `modelfile_text` for `gguf_path` to the new file `path` (staged). Returns `path`."""
    with staged_file(path) as staging:
        staging.write_text(modelfile_text(gguf_path.name, tokenizer), encoding="utf-8")
    return path


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
