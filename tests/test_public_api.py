"""The package root is the public API: a user prunes, saves, searches and applies a study importing only `adapruner`."""

import json
from pathlib import Path

import pytest
import torch

import adapruner
from tests.helpers import save_tiny_model, write_pool


def test_every_public_name_resolves_and_none_shadows_a_submodule():
    import pkgutil

    submodules = {info.name for info in pkgutil.iter_modules(adapruner.__path__)}
    for name in adapruner.__all__:
        assert getattr(adapruner, name) is not None
        assert name not in submodules, f"adapruner.{name} would shadow the submodule"
    with pytest.raises(AttributeError):
        adapruner.no_such_name  # noqa: B018


def test_prune_search_and_apply_from_the_root_only(tmp_path):
    save_tiny_model(tmp_path / "model")
    write_pool(tmp_path / "a.txt", seed=1)
    model, tokenizer = adapruner.load_model(str(tmp_path / "model"))
    before = adapruner.count_params(model)
    options = adapruner.PruneOptions(
        adapruner.PruneSpec(None, target_params=0.1, metric="l2", allocation="global", layers="all")
    )
    result = adapruner.prune_model(model, tokenizer, options, progress=False)
    assert isinstance(result.plan, adapruner.PrunePlan) and before - adapruner.count_params(model) >= 0.1 * before
    adapruner.save_pruned(model, tokenizer, tmp_path / "pruned")
    reloaded, _ = adapruner.load_model(str(tmp_path / "pruned"))
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)

    search = adapruner.SearchOptions(
        model=str(tmp_path / "model"),
        pools=[str(tmp_path / "a.txt")],
        pool_size=4,
        seq_len=16,
        spec=adapruner.PruneSpec(layers="all"),
        metrics=("l2", "vector"),
        sample_counts=(1, 2),
        blocks_per_pool=2,
        val_windows=2,
        trials=2,
        cache_dir=str(tmp_path / "cache"),
        cache_dtype="float32",
    )
    best = adapruner.run_search(search, Path(tmp_path / "s"), progress=False)
    assert (
        isinstance(best, adapruner.BestTrial)
        and json.loads((tmp_path / "s" / "best.json").read_text())["trial"] == best.trial
    )
    dense, tokenizer = adapruner.load_model(str(tmp_path / "model"))
    applied = adapruner.apply_study_plan(dense, best, tokenizer)
    assert applied.plan == best.prune_plan
