"""`--align N`: every pruned layer keeps a multiple of N MLP channels under ratios, budgets (uniform and global, met
within one block of N) and searches; N that does not divide a layer's width is a one-line error."""

from pathlib import Path

import pytest
import torch

from adapruner.choosing.allocation import count_params, prices
from adapruner.choosing.selection import plan_allocation, plan_pruning
from adapruner.choosing.spec import PruneSpec
from adapruner.commands.search import run_search
from adapruner.cutting.removal import apply_plan, plan_removed
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import layer_info
from adapruner.scoring.importance import Importance
from adapruner.searching.search_options import SearchOptions
from tests.helpers import save_tiny_model, write_pool
from tests.models import tiny_llama


def test_a_ratio_removes_whole_blocks():
    model = tiny_llama(n_heads=4, n_kv=2)
    plan = plan_pruning(model, Importance("l2"), 0.25, range(0, 3), "kv", align=8)  # 24 channels: 3 blocks of 8
    assert [len(kept) for kept in plan.mlp.values()] == [16, 16, 16]
    unaligned = plan_pruning(model, Importance("l2"), 0.25, range(0, 3), "kv")
    assert [len(kept) for kept in unaligned.mlp.values()] == [18, 18, 18]


@pytest.mark.parametrize("allocation", ["uniform", "depth", "global"])
@pytest.mark.parametrize("align", [4, 8])
def test_budgets_keep_aligned_widths_within_one_block(allocation, align):
    model = tiny_llama(n_heads=4, n_kv=2, layers=3, seed=1)
    spec = PruneSpec(
        None,
        target_params=0.15,
        layers="all",
        allocation=allocation,
        depth_slope=0.5,
        align=align,
        metric="l2",
        min_keep=0.1,
    )
    plan = plan_allocation(model, Importance("l2"), spec)
    assert all(len(kept) % align == 0 for kept in plan.mlp.values())
    target = 0.15 * count_params(model)
    block = align * prices(layer_info(model, 0), "kv")[1]
    removed = plan_removed(model, plan)
    assert target <= removed < target + block
    before = count_params(model)
    apply_plan(model, plan)
    assert before - count_params(model) == removed


def test_an_align_that_does_not_divide_the_width_is_one_line():
    model = tiny_llama()
    with pytest.raises(AdaPrunerError, match="--align 7 does not divide layer 0's 24 MLP channels"):
        plan_allocation(model, Importance("l2"), PruneSpec(0.25, layers="all", align=7, metric="l2"))


def test_a_search_delivers_aligned_plans(tmp_path):
    save_tiny_model(tmp_path / "model")
    write_pool(tmp_path / "a.txt", seed=1)
    options = SearchOptions(
        model=str(tmp_path / "model"),
        spec=PruneSpec(None, target_params=0.15, layers="all", align=8),
        pools=[str(tmp_path / "a.txt")],
        pool_size=4,
        seq_len=16,
        metrics=("l2", "vector"),
        sample_counts=(1, 2),
        blocks_per_pool=2,
        val_windows=2,
        trials=3,
        allocations=("uniform", "global"),
        cache_dir=str(tmp_path / "c"),
        cache_dtype="float32",
    )
    best = run_search(options, Path(tmp_path / "s"), progress=False)
    assert best.prune_spec.align == 8 and all(len(kept) % 8 == 0 for kept in best.prune_plan.mlp.values())
    assert torch.tensor(best.removed_fraction) >= 0.15
