"""Allocation under a parameter budget: uniform/depth land within one MLP channel of it, global ranks standardised
scores across layers with a floor per module, and every trial of a --target-params study removes the same count."""

import json
import math

import optuna
import pytest
import torch

from adapruner.choosing.allocation import (
    budget_counts,
    candidate_costs,
    count_params,
    depth_weights,
    global_counts,
    prices,
    removed_by,
    target_count,
)
from adapruner.choosing.spec import PruneSpec
from adapruner.cli import main
from adapruner.cutting.removal import plan_removed
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import layer_info
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key
from adapruner.searching.search import TrialConfig, trial_plan
from tests.helpers import save_tiny_model, search_args, write_pool
from tests.models import span, tiny_llama

LAYERS = range(0, 4)


@pytest.fixture
def model():
    return tiny_llama(n_heads=4, n_kv=2, layers=4)


@pytest.mark.parametrize("slope", [0.0, 0.6])
@pytest.mark.parametrize(("attention", "mlp"), [(True, True), (False, True), (True, False)])
def test_budgeted_uniform_and_depth_land_within_one_unit_of_the_budget(model, slope, attention, mlp):
    for fraction in (0.05, 0.12, 0.2):
        target = target_count(model, fraction)
        try:
            counts = budget_counts(
                model, LAYERS, target, depth_weights(LAYERS, slope), PruneSpec(prune_attention=attention, prune_mlp=mlp)
            )
        except AdaPrunerError as exc:  # attention alone cannot give 20% without emptying a layer: said so, in one line
            assert not mlp and "out of reach" in str(exc)
            continue
        attn_price, channel = prices(layer_info(model, 0), "kv")
        removed = removed_by(model, counts, "kv")
        assert target <= removed < target + (channel if mlp else attn_price)
        if slope and mlp:  # deeper layers lose at least as many channels
            assert [counts[i][1] for i in LAYERS] == sorted(counts[i][1] for i in LAYERS)
        if (
            not slope and mlp
        ):  # uniform: layers lose as many attention units and MLP channels, within one unit of each other
            for kind in (0, 1):
                assert max(c[kind] for c in counts.values()) - min(c[kind] for c in counts.values()) <= 1
        same = budget_counts(
            model,
            LAYERS,
            target,
            depth_weights(LAYERS, 0.0),
            PruneSpec(prune_attention=attention, prune_mlp=mlp, same_size=True),
        )
        assert (
            len(set(same.values())) == 1 and removed_by(model, same, "kv") >= target
        )  # one size for a stock-config save


def random_scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = {}
    for i in LAYERS:
        info = layer_info(model, i)
        scale = (
            10.0 ** torch.rand(1, generator=g).item() * 3
        )  # modules on different scales: standardisation makes them comparable
        scores[(i, "attn")] = scale * torch.rand(info.n_kv_heads, generator=g)
        scores[(i, "mlp")] = scale * torch.rand(info.intermediate, generator=g) ** 3
    return scores


@pytest.mark.parametrize("min_keep", [0.0, 0.25, 0.5])
def test_global_ranks_standardised_scores_under_the_budget_and_floor(model, min_keep):
    scores = random_scores(model)
    target = target_count(model, 0.15)
    counts = global_counts(model, scores, LAYERS, target, PruneSpec(min_keep=min_keep))
    _attn_price, channel = prices(layer_info(model, 0), "kv")
    removed = removed_by(model, counts, "kv")
    assert (
        target <= removed < target + channel
    )  # within one MLP channel: an attention unit that would pass it is passed over
    last_taken, first_left = -math.inf, math.inf
    for i in LAYERS:
        info = layer_info(model, i)
        for slot, (module, units) in enumerate((("attn", info.n_kv_heads), ("mlp", info.intermediate))):
            keep_floor = max(1, math.ceil(min_keep * units))
            assert units - counts[i][slot] >= keep_floor
            costs = candidate_costs(scores[(i, module)], info, module, "kv")
            if module == "attn":
                continue
            if counts[i][slot]:
                last_taken = max(last_taken, costs[counts[i][slot] - 1].item())
            if counts[i][slot] < units - keep_floor:
                first_left = min(first_left, costs[counts[i][slot]].item())
    assert last_taken <= first_left  # no removable channel was kept while a higher standardised score went


def test_global_budget_out_of_reach_names_min_keep(model):
    with pytest.raises(AdaPrunerError, match="lower --min-keep"):
        global_counts(model, random_scores(model), LAYERS, target_count(model, 0.6), PruneSpec(min_keep=0.9))


def test_every_trial_of_a_budget_removes_the_same_count(model):
    ids = torch.randint(0, 97, (8, 9), generator=torch.Generator().manual_seed(1))
    key = cache_key("tiny", model, CandidatePool(["a"], 8, 9, 0), LAYERS, activations=True, dtype="float32")
    cache = build_cache(model, key, ids, [("a", i) for i in range(8)], progress=False)
    setting = PruneSpec(0.25, target_params=0.2, layers=span(LAYERS), min_keep=0.25)
    total = count_params(model)
    removed = []
    for allocation, slope in (("uniform", 0.0), ("depth", -0.5), ("depth", 0.8), ("global", 0.0)):
        for metric in ("l2", "vector", "taylor1", "fluct"):
            for samples in ([0, 1], [2, 5, 7]):
                plan = trial_plan(
                    model, cache, setting, TrialConfig(samples, metric, "sum", slope, allocation=allocation)
                )
                removed.append(plan_removed(model, plan) / total)
    assert min(removed) >= 0.2 and max(removed) - min(removed) <= 0.005


def test_a_target_params_search_reports_the_fraction_removed(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    write_pool(tmp_path / "a.txt", seed=1)
    out = tmp_path / "s"
    argv = search_args(
        tmp_path,
        out,
        "--target-params",
        "0.15",
        "--allocations",
        "uniform,depth,global",
        "--compensations",
        "none,bias,lsq",
        "--metrics",
        "l2,vector,fluct",
        "--trials",
        "6",
    )
    assert main(argv) == 0
    best = json.loads((out / "best.json").read_text())
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{out / 'study.db'}")
    fractions = [t.user_attrs["removed_fraction"] for t in study.trials]
    assert len(fractions) == 6 and min(fractions) >= 0.15 and max(fractions) - min(fractions) <= 0.005
    assert best["spec"]["target_params"] == 0.15 and best["removed_fraction"] == pytest.approx(
        study.best_trial.user_attrs["removed_fraction"]
    )
    assert {t.params["allocation"] for t in study.trials} <= {"uniform", "depth", "global"}
    assert "removed" in (out / "trials.txt").read_text()
    code = main(
        [
            "prune",
            "--model",
            str(tmp_path / "model"),
            "--from-study",
            str(out),
            "--no-eval",
            "--out",
            str(tmp_path / "p"),
        ]
    )
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert code == 0 and report["plan"] == best["plan"]
    added_biases = (
        48 * 2 * 3 if report["compensated"] else 0
    )  # compensated: every o_proj and down_proj gets a bias of hidden size 48
    assert (
        report["params_before"] - report["params_after"]
        == round(best["removed_fraction"] * report["params_before"]) - added_biases
    )
    assert bool(report["compensated"]) == (best["spec"]["compensation"] != "none")
