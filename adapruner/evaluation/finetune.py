"""LoRA recovery of a pruned model with peft (LLM-Pruner's recipe by default), then merge or keep the adapter."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from adapruner.data.finetune_data import collate, load_train_examples
from adapruner.devices import DTYPES, model_device
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.evaluate import perplexity
from adapruner.model.structure import projection_names


@dataclass
class LoraOptions:
    """LLM-Pruner's defaults: r 8, alpha 16, dropout 0.05, lr 1e-4, cutoff 256."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 1e-4
    cutoff: int = 256
    batch_size: int = 4
    max_steps: int = 100
    max_minutes: float | None = None
    eval_every: int = 25
    train_on_prompt: bool = False
    dtype: str = "float32"  # the weights' dtype while training (a name of `adapruner.devices.DTYPES`)
    seed: int = 0
    targets: tuple[str, ...] | None = None  # None: every attention and MLP projection of the model's family


@dataclass
class FinetuneResult:
    """The peft-wrapped model and what happened: per-step loss, (step, validation ppl) points, why it stopped."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    val_ppl: list[tuple[int, float]] = field(default_factory=list)
    stopped: str = ""
    seconds: float = 0.0


def finetune(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: str,
    options: LoraOptions,
    val_windows: torch.Tensor | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Train LoRA adapters on `data` until `max_steps` or `max_minutes`; validation perplexity every `eval_every`."""
    from peft import LoraConfig, get_peft_model

    if options.dtype not in DTYPES:
        raise AdaPrunerError(f"unknown --dtype {options.dtype!r}: use {', '.join(DTYPES)}")
    if options.max_steps < 1 or options.batch_size < 1:
        raise AdaPrunerError("--steps and --batch-size must be at least 1")
    examples = load_train_examples(tokenizer, data, options.cutoff, options.train_on_prompt)
    torch.manual_seed(options.seed)
    model = model.to(DTYPES[options.dtype])
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.targets or projection_names(model)),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=options.lr)
    result = FinetuneResult(peft_model)
    order = random.Random(options.seed)
    pad_id = next(
        (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
    )  # masked out anyway
    queue: list[int] = []
    started = time.perf_counter()
    bar = tqdm(total=options.max_steps, desc="lora", unit="step", disable=not progress)
    for step in range(1, options.max_steps + 1):
        if len(queue) < options.batch_size:
            fresh = list(range(len(examples)))
            order.shuffle(fresh)
            queue += fresh
        batch, queue = queue[: options.batch_size], queue[options.batch_size :]
        input_ids, mask, labels = (t.to(model_device(peft_model)) for t in collate(examples, batch, pad_id))
        peft_model.train()
        loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        if not torch.isfinite(loss):
            raise AdaPrunerError(
                f"training loss became {loss.item()} at step {step}: lower --lr or train with --dtype float32"
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if val_windows is not None and (step % options.eval_every == 0 or step == options.max_steps):
            peft_model.eval()
            result.val_ppl.append((step, perplexity(peft_model, val_windows, progress=False)))
            bar.set_postfix(loss=f"{loss.item():.3f}", val_ppl=f"{result.val_ppl[-1][1]:.2f}")
        if options.max_minutes is not None and time.perf_counter() - started > 60 * options.max_minutes:
            result.stopped = f"time budget of {options.max_minutes} min reached at step {step}"
            break
    bar.close()
    peft_model.eval()
    result.stopped = result.stopped or f"step budget of {options.max_steps} reached"
    result.seconds = time.perf_counter() - started
    return result


def merged(result: FinetuneResult) -> nn.Module:
    """The base model with the LoRA deltas added into its weights (peft's merge_and_unload),
    in the dtype it trained in."""
    return result.model.merge_and_unload().eval()


def mean_loss(losses: list[float], last: int = 10) -> float:
    tail = losses[-last:]
    return sum(tail) / len(tail) if tail else math.nan
