"""Training data for LoRA recovery: token windows of plain text, or Alpaca-style instruction records.

Plain text (`wiki` = its calibration articles, `news`, `plays`, a `.txt`/`.jsonl` text file): non-overlapping
windows of `cutoff` tokens, loss on every token. Alpaca (a `.json` list or `.jsonl` of objects with
`instruction`, optional `input`, `output`): the prompt template below, loss on the response tokens only unless
`train_on_prompt`; each record truncated to `cutoff` tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from adapruner.data.calibration import pool_windows
from adapruner.data.corpora import read_utf8
from adapruner.errors import AdaPrunerError

IGNORE = -100
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


@dataclass
class TrainExamples:
    """Token rows with labels (IGNORE where no loss is taken); rows may differ in length."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.input_ids)


def load_train_examples(
    tokenizer: PreTrainedTokenizerBase, spec: str, cutoff: int, train_on_prompt: bool = False
) -> TrainExamples:
    """Examples for `spec`: a pool name or path; Alpaca records are recognised by their `instruction` field."""
    records = _alpaca_records(Path(spec)) if Path(spec).suffix in (".json", ".jsonl") and Path(spec).is_file() else None
    if records is None:
        windows = pool_windows(tokenizer, spec, cutoff, "calib")
        if windows.shape[0] == 0:
            raise AdaPrunerError(f"{spec!r} holds less than one window of {cutoff} tokens: lower --cutoff or add text")
        return TrainExamples(list(windows), list(windows.clone()))
    ids, labels = [], []
    for record in records:
        template = PROMPT_WITH_INPUT if record.get("input") else PROMPT
        prompt = template.format(instruction=record["instruction"], input=record.get("input", ""))
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        row = torch.tensor((prompt_ids + answer_ids)[:cutoff])
        label = row.clone()
        if not train_on_prompt:
            label[: len(prompt_ids)] = IGNORE
        if (label != IGNORE).sum() > 1:
            ids.append(row)
            labels.append(label)
    if not ids:
        raise AdaPrunerError(f"{spec}: no record keeps a response within --cutoff {cutoff}: raise --cutoff")
    return TrainExamples(ids, labels)


def _alpaca_records(path: Path) -> list[dict] | None:
    """Alpaca records of a .json/.jsonl file, or None when the file holds plain `text` records."""
    text = read_utf8(path)
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AdaPrunerError(
                f"{path}:{exc.lineno}: not valid JSON: pass a list of {{instruction, input, output}} objects"
            ) from None
        numbered = list(enumerate(records if isinstance(records, list) else [records], start=1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError:
                    raise AdaPrunerError(f"{path}:{number}: not valid JSON: each line must be one object") from None
    if (
        numbered
        and isinstance(numbered[0][1], dict)
        and "text" in numbered[0][1]
        and "instruction" not in numbered[0][1]
    ):
        return None
    for number, record in numbered:
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("instruction"), str)
            or not isinstance(record.get("output"), str)
        ):
            raise AdaPrunerError(
                f"{path}:{number}: needs string fields 'instruction' and 'output' (Alpaca format) or 'text'"
            )
    return [record for _, record in numbered]


def collate(
    examples: TrainExamples, indices: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) for the chosen examples."""
    length = max(examples.input_ids[i].numel() for i in indices)
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        n = examples.input_ids[i].numel()
        ids[row, :n], labels[row, :n], mask[row, :n] = examples.input_ids[i], examples.labels[i], 1
    return ids, mask, labels
