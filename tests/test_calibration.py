"""Text pools, the fixed wiki split, addressed windows and their errors."""

import pytest
import torch

from adapruner.data.calibration import calibration_samples, parse_calib_spec, pool_windows
from adapruner.data.corpora import pool_documents, wiki_articles, wiki_split
from adapruner.errors import AdaPrunerError


def test_wiki_split_is_fixed_by_page_id_and_disjoint():
    articles = wiki_articles()
    ids = [page_id for page_id, _ in articles]
    assert ids == sorted(ids) and len(ids) > 60
    evaluation, validation, calibration = (set(wiki_split(s)) for s in ("eval", "val", "calib"))
    assert not evaluation & calibration and not evaluation & validation and not validation & calibration
    assert len(evaluation) + len(validation) + len(calibration) == len(articles)
    assert wiki_split("eval")[0] == articles[0][1]  # article 0 (lowest page id) is evaluation text


def test_builtin_pools_hold_real_text():
    assert len(pool_documents("news")) == 300
    assert len(pool_documents("plays")) == 38  # 37 canonical plays plus Edward III
    assert "Iago" in "".join(pool_documents("plays"))


def test_spec_parsing():
    assert parse_calib_spec("wiki:16") == [("wiki", 16)]
    assert parse_calib_spec("news:8, data/my.txt:4") == [("news", 8), ("data/my.txt", 4)]
    for bad in ("wiki", "wiki:0", "wiki:x", ":3"):
        with pytest.raises(AdaPrunerError, match="POOL:N"):
            parse_calib_spec(bad)


def test_samples_are_addressed_and_deterministic(smollm2_loaded):
    _, tokenizer = smollm2_loaded
    a = calibration_samples(tokenizer, "wiki:4,news:2", 64, seed=7)
    b = calibration_samples(tokenizer, "wiki:4,news:2", 64, seed=7)
    c = calibration_samples(tokenizer, "wiki:4,news:2", 64, seed=8)
    assert a.addresses == b.addresses and torch.equal(a.input_ids, b.input_ids)
    assert a.addresses != c.addresses
    assert a.input_ids.shape == (6, 64)
    windows = {pool: pool_windows(tokenizer, pool, 64) for pool in ("wiki", "news")}
    for row, (pool, index) in zip(a.input_ids, a.addresses):
        assert torch.equal(row, windows[pool][index])


def test_user_files_and_their_errors(smollm2_loaded, tmp_path):
    _, tokenizer = smollm2_loaded
    text = tmp_path / "mine.txt"
    text.write_text("first paragraph here.\n\nsecond one follows. " * 40)
    assert calibration_samples(tokenizer, f"{text}:2", 16).input_ids.shape == (2, 16)
    with pytest.raises(AdaPrunerError, match="holds .* windows .* ask for at most"):
        calibration_samples(tokenizer, f"{text}:100000", 16)
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(AdaPrunerError, match="bad.jsonl:2"):
        pool_documents(str(lines))
    with pytest.raises(AdaPrunerError, match="unknown pool 'nope'"):
        pool_documents("nope")
