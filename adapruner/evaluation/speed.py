"""Inference speed of a model where it runs: prefill tokens/s (batches of `prefill_len`-token windows) and decode
tokens/s (batch 1, one token at a time with the KV cache), each the median of `repeats` timed runs after a warm-up.

Token ids are drawn at random (speed does not depend on the text); every measure runs the same shapes for a dense
and a pruned model, so their ratio is the speed-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from adapruner.devices import model_device
from adapruner.model.families import text_config


@dataclass(frozen=True)
class SpeedShape:
    """What is timed: prefill of `batches` × `prefill_len` tokens; decode of `new_tokens` after a `prompt_len`
    prompt."""

    prefill_len: int = 512
    batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 32
    new_tokens: int = 128
    repeats: int = 3


DEFAULT_SHAPE = SpeedShape()


def measure_speed(model: nn.Module, shape: SpeedShape = DEFAULT_SHAPE, seed: int = 0) -> dict[str, float]:
    """{"prefill_b{B}_tok_s": …, "decode_b1_tok_s": …} of `model` on its own device; windows longer than the model's
    context are cut to it."""
    context = (
        getattr(text_config(model.config), "max_position_embeddings", None) or shape.prefill_len + shape.new_tokens
    )
    shape = replace(
        shape, prefill_len=min(shape.prefill_len, context), new_tokens=min(shape.new_tokens, context - shape.prompt_len)
    )
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    speeds = {}
    with torch.no_grad():
        for batch in shape.batches:
            ids = torch.randint(0, vocab, (batch, shape.prefill_len), generator=generator).to(device)
            seconds = median_seconds(lambda ids=ids: model(input_ids=ids, use_cache=False), device, shape.repeats)
            speeds[f"prefill_b{batch}_tok_s"] = batch * shape.prefill_len / seconds
        prompt = torch.randint(0, vocab, (1, shape.prompt_len), generator=generator).to(device)
        seconds = median_seconds(lambda: _decode(model, prompt, shape.new_tokens), device, shape.repeats)
        speeds["decode_b1_tok_s"] = shape.new_tokens / seconds
    return speeds


def _decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> None:
    """Greedy decoding of `new_tokens` tokens with the KV cache (the prompt's prefill is part of the first step)."""
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)


def median_seconds(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `repeat` calls of `fn` after `warmup` untimed ones (allocations, kernel selection), the
    device synchronised around each timed call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speedups(dense: dict[str, float], pruned: dict[str, float]) -> dict[str, float]:
    """pruned / dense tokens/s of every measure both hold."""
    return {name: pruned[name] / dense[name] for name in dense if name in pruned}
