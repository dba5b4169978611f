"""Tokenised windows of text pools; a calibration sample is addressed as (pool, index).

Window k of a pool is tokens `k*seq_len … (k+1)*seq_len - 1` of the pool's documents joined by blank lines and
tokenised once (no special tokens): addresses do not depend on the seed. A seed only chooses which windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from adapruner.data.corpora import Split, pool_documents
from adapruner.errors import AdaPrunerError


@dataclass(frozen=True)
class Samples:
    """A batch of token windows (n × seq_len) with the (pool, index) address of each row."""

    input_ids: torch.Tensor
    addresses: tuple[tuple[str, int], ...]


DEFAULT_SEQ_LEN = 128  # tokens per calibration, validation and evaluation window unless told otherwise


def pool_windows(tokenizer: PreTrainedTokenizerBase, pool: str, seq_len: int, split: Split = "calib") -> torch.Tensor:
    """Every full window of `seq_len` tokens of a pool's split, shape (n_windows × seq_len), int64."""
    if seq_len < 2:
        raise AdaPrunerError(
            f"--seq-len {seq_len} is too short: use at least 2 tokens ({DEFAULT_SEQ_LEN} is the usual choice)"
        )
    tokens = _pool_tokens(tokenizer, pool, split)
    n_windows = tokens.numel() // seq_len
    return tokens[: n_windows * seq_len].view(n_windows, seq_len)


@lru_cache(maxsize=16)
def _pool_tokens(tokenizer: PreTrainedTokenizerBase, pool: str, split: Split) -> torch.Tensor:
    text = "\n\n".join(pool_documents(pool, split))
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def parse_calib_spec(spec: str) -> list[tuple[str, int]]:
    """`"wiki:16,news:8"` → [("wiki", 16), ("news", 8)]; a path may stand for a pool (`data/my.txt:32`)."""
    parts = []
    for item in spec.split(","):
        pool, sep, count = item.strip().rpartition(":")
        if not sep or not pool or not count.isdigit() or int(count) < 1:
            raise AdaPrunerError(f"bad calibration spec {item!r}: write POOL:N, e.g. wiki:16 or news:8,plays:8")
        parts.append((pool, int(count)))
    return parts


def seeded_draw(
    tokenizer: PreTrainedTokenizerBase, pool: str, count: int, seq_len: int, seed: int, fix: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(window indices, windows) of `count` calibration windows of `pool`, drawn without replacement for `seed`,
    in draw order. Too few windows raise an error ending in `fix` (its `{n}` becomes the number available)."""
    windows = pool_windows(tokenizer, pool, seq_len, "calib")
    n = windows.shape[0]
    if count > n:
        raise AdaPrunerError(f"pool {pool!r} holds {n} windows of {seq_len} tokens, {count} asked: {fix.format(n=n)}")
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    return chosen, windows[chosen]


def calibration_samples(tokenizer: PreTrainedTokenizerBase, spec: str, seq_len: int, seed: int = 0) -> Samples:
    """Draw the windows named by `spec` (without replacement within a pool), reproducibly for `seed`;
    sorted per pool."""
    rows, addresses = [], []
    for pool, count in parse_calib_spec(spec):
        chosen, drawn = seeded_draw(tokenizer, pool, count, seq_len, seed, "ask for at most {n} or shorten --seq-len")
        order = chosen.argsort()
        chosen = chosen[order]
        rows.append(drawn[order])
        addresses.extend((pool, int(k)) for k in chosen)
    return Samples(torch.cat(rows), tuple(addresses))


def windows_at(tokenizer: PreTrainedTokenizerBase, addresses: list[tuple[str, int]], seq_len: int) -> Samples:
    """The calibration windows at the given (pool, index) addresses, in that order."""
    rows = []
    for pool, index in addresses:
        windows = pool_windows(tokenizer, pool, seq_len, "calib")
        if not 0 <= index < windows.shape[0]:
            raise AdaPrunerError(
                f"pool {pool!r} has no window {index} at seq_len {seq_len}: "
                "the addresses come from another seq_len or corpus version"
            )
        rows.append(windows[index])
    return Samples(torch.stack(rows), tuple((pool, int(index)) for pool, index in addresses))


def window_batches(
    windows: torch.Tensor, batch_size: int, device: torch.device | str, bar: str | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(k, rows k … k + batch_size − 1 of `windows` on `device`) for k = 0, batch_size, 2·batch_size, …: the one
    batched pass over windows that statistics, caches, captures and perplexity share; `bar` labels a tqdm bar (None:
    no bar)."""
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=bar, unit="batch", disable=bar is None):
        yield start, windows[start : start + batch_size].to(device)
