"""The refit pool: one forward pass gives the moments every trial refits on (and that act/fluct/obs trials may score
on); what a trial scored from it is what `prune` delivers on the same windows."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch

from adapruner.choosing.selection import plan_allocation
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.compensation import refit_updates
from adapruner.cutting.pruning import PruneOptions, apply_study_plan, prune_model
from adapruner.data.calibration import calibration_samples
from adapruner.errors import AdaPrunerError
from adapruner.model.models import load_model
from adapruner.model.structure import output_projections
from adapruner.scoring.importance import Importance
from adapruner.scoring.refit_pool import RefitPool, collect_refit_pool, load_or_collect, refit_key, scored_by_moments
from adapruner.scoring.sources import CalibrationPasses
from adapruner.searching.search import SearchSpace, TrialConfig, suggest, trial_plan, trial_updates
from tests.helpers import (
    byte_level_tokenizer,
    one_error_line,
    run_cli,
    search_args,
    tiny_family,
    tiny_search,
    write_pool,
)


@pytest.fixture
def pooled(tmp_path):
    """A tiny llama, the byte-level tokenizer and a text pool of ≥ 6 windows of 16 tokens."""
    write_pool(tmp_path / "a.txt", seed=1)
    return tiny_family("llama"), byte_level_tokenizer(), f"{tmp_path / 'a.txt'}:6"


@pytest.mark.parametrize("allocation", ["uniform", "error", "loss"])
@pytest.mark.parametrize("metric", ["act", "fluct", "obs"])
def test_a_plan_scored_on_the_pool_is_a_fresh_prune_on_its_windows(pooled, metric, allocation):
    model, tokenizer, calib = pooled
    pool = collect_refit_pool(model, tokenizer, (calib, 16, 0), range(4), progress=False, fisher=allocation == "loss")
    spec = PruneSpec(0.4, layers="all", granularity="query", metric=metric, allocation=allocation)
    config = TrialConfig([], metric, "sum", allocation=allocation, statistics="refit")
    scored = trial_plan(model, None, spec, config, refit=pool)
    fresh = prune_model(copy.deepcopy(model), tokenizer, PruneOptions(spec, calib, seq_len=16), progress=False)
    assert scored == fresh.plan and scored.mlp[0] != list(range(len(scored.mlp[0])))


def test_the_pool_forms_each_covariance_when_it_is_read_not_all_at_once(pooled):
    """Streamed Σ (issue 34): the pool's importance holds no Σ; reading one output projection's forms it from its Gram
    on the projection's device, equal to the Σ of its input moments (the plans above equal fresh prunes)."""
    from adapruner.model.structure import layer_info, mlp_group

    model, tokenizer, calib = pooled
    pool = collect_refit_pool(model, tokenizer, (calib, 16, 0), range(4), progress=False, fisher=True)
    spec = PruneSpec(0.4, layers="all", metric="fluct", allocation="loss")
    importance = pool.importance(model, spec)
    assert all(stats.act_cov is None for stats in importance.stats.values())
    down = next(m for m in mlp_group(layer_info(model, 2)).members if m.dim == 1)
    formed = importance.covariance(down)
    assert formed.device == down.linear.weight.device
    torch.testing.assert_close(formed, pool.moments[down.name].covariance, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "phi3"])
def test_layer_by_layer_moments_are_the_whole_model_s(model_type):
    """The pool is collected one decoder layer at a time, each layer's moments moved to host memory when done: the
    same moments (1e-5) as hooks over whole-model passes, for every prunable linear, with the output projections'
    Grams."""
    from adapruner.model.structure import prunable_linears
    from adapruner.scoring.collect import collect_input_moments, collect_layer_moments

    model = tiny_family(model_type)
    ids = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(7))
    layered = collect_layer_moments(model, ids, range(1, 4), "cpu", progress=False)
    outputs = output_projections(model, range(1, 4))
    whole = collect_input_moments(model, prunable_linears(model, range(1, 4)) | outputs, ids, False, 2, False, outputs)
    assert layered.keys() == whole.keys()
    for name, m in whole.items():
        torch.testing.assert_close(layered[name].mean, m.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layered[name].square_mean, m.square_mean, rtol=1e-5, atol=1e-6)
        assert (m.gram is None) == (name not in outputs)
        if m.gram is not None:
            torch.testing.assert_close(layered[name].gram, m.gram, rtol=1e-5, atol=1e-6)


def test_the_pool_refit_is_the_refit_from_its_windows(pooled):
    model, tokenizer, calib = pooled
    pool = collect_refit_pool(model, tokenizer, (calib, 16, 0), range(4), progress=False)
    spec = PruneSpec(0.5, layers="all", metric="l2", compensation="lsq", damp=0.3)
    plan = plan_allocation(model, Importance("l2"), spec)
    updates = trial_updates(model, None, spec, TrialConfig([], "l2", "sum", compensation="lsq"), plan, pool)
    windows = calibration_samples(tokenizer, calib, 16).input_ids
    reference = refit_updates(model, plan, CalibrationPasses(windows, progress=False), "lsq", 0.3)
    assert updates.keys() == reference.keys() == output_projections(model, range(4)).keys()
    for name, (weight, bias) in updates.items():
        torch.testing.assert_close(weight, reference[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias, reference[name][1], rtol=1e-4, atol=1e-5)


def test_a_saved_pool_reads_back_whole_and_a_damaged_one_is_one_line(pooled, tmp_path):
    model, tokenizer, calib = pooled
    path = tmp_path / refit_key("digest", calib, 16, 0, range(4), ["text"])
    assert path.name != refit_key("digest", calib, 16, 0, range(4), ["edited text"])  # the pool's text is in the key
    pool = load_or_collect(model, tokenizer, (calib, 16, 0), range(4), path, progress=False)
    again = RefitPool.load(path)
    assert (again.calib, again.seq_len, again.seed, again.tokens) == (calib, 16, 0, 6 * 16)
    assert again.moments.keys() == pool.moments.keys()
    for name, m in pool.moments.items():
        read = again.moments[name]
        assert torch.equal(read.mean, m.mean) and torch.equal(read.square_mean, m.square_mean)
        assert (m.gram is None) == (name not in output_projections(model, range(4)))
        assert m.gram is None or torch.equal(read.gram, m.gram)
    assert again.fisher == {}
    fisher = load_or_collect(model, tokenizer, (calib, 16, 0), range(4), path, progress=False, fisher=True).fisher
    assert fisher.keys() == output_projections(model, range(4)).keys()  # a pool without it was collected again
    assert all(torch.equal(RefitPool.load(path).fisher[name], f) for name, f in fisher.items())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdaPrunerError, match="is damaged .*delete it"):
        RefitPool.load(path)


def test_suggest_draws_only_the_parameters_a_trial_uses():
    blocks = {"a_0": [0, 1], "a_1": [2, 3]}
    space = SearchSpace(("taylor2", "fluct", "act"), ("sum", "max"), (1, 2), statistics=("subset", "refit"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        config = suggest(trial, space, blocks)
        params = set(trial.params)
        seen.add((config.metric, config.statistics))
        assert ("statistics" in params) == scored_by_moments(config.metric)
        assert ("aggregation" in params) == (config.metric != "fluct")  # fluct scores the output columns alone
        subset = config.statistics == "subset"
        assert ("n_samples" in params) == subset and any(p.startswith("block_") for p in params) == subset
        assert (config.samples == []) == (not subset)
        study.tell(trial, 1.0)
    assert {("taylor2", "subset"), ("fluct", "refit"), ("act", "refit"), ("act", "subset")} <= seen


@pytest.mark.parametrize("allocations", [("uniform",), ("loss",)])
def test_a_search_on_the_refit_pool_delivers_what_it_scored(tmp_path, allocations):
    """Trials score act/fluct/obs on the refit pool (loss: weighted by its output Fisher) and refit on it; `prune
    --from-study` (plan as scored) and a fresh prune of the recipe (`PruneOptions.from_best`) give the same plan and
    the same refit weights."""
    write_pool(tmp_path / "a.txt", seed=1)
    calib = f"{tmp_path / 'a.txt'}:6"
    best = tiny_search(
        tmp_path,
        tiny_family("llama"),
        spec=PruneSpec(None, target_params=0.2, layers="all", granularity="query", damp=0.3),
        metrics=("act", "fluct", "obs"),
        allocations=allocations,
        compensations=("lsq",),
        statistics=("refit",),
        refit_calib=calib,
        trials=2,
    )
    assert (best.statistics, best.samples, best.refit_calib) == ("refit", [], calib)
    assert best.prune_spec.allocation == allocations[0]
    best_row = (tmp_path / "s" / "trials.txt").read_text().splitlines()[2].split()
    assert best.prune_spec.metric in best_row and "refit" in best_row  # the table says where it scored
    loaded, tokenizer = load_model(str(tmp_path / "model"))
    applied, fresh = copy.deepcopy(loaded), copy.deepcopy(loaded)
    saved = copy.deepcopy(loaded)
    assert apply_study_plan(applied, best, tokenizer, progress=False).plan == best.prune_plan
    assert prune_model(fresh, tokenizer, PruneOptions.from_best(best), progress=False).plan == best.prune_plan
    pool_file = json.loads((tmp_path / "s" / "search.json").read_text())["refit_pool"]
    apply_study_plan(saved, best, tokenizer, progress=False, refit_pool=RefitPool.load(Path(pool_file)))
    for name, linear in output_projections(applied, range(4)).items():
        for other in (fresh, saved):  # a fresh prune, and the plan refit from the search's saved pool
            torch.testing.assert_close(linear.weight, other.get_submodule(name).weight, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(linear.bias, other.get_submodule(name).bias, rtol=1e-4, atol=1e-5)


def test_subset_trials_refit_on_the_pool_and_prune_does_the_same(tmp_path):
    write_pool(tmp_path / "a.txt", seed=1)
    calib = f"{tmp_path / 'a.txt'}:6"
    best = tiny_search(
        tmp_path,
        tiny_family("llama"),
        spec=PruneSpec(0.5, layers="all", damp=0.3),
        metrics=("l2", "taylor1"),
        compensations=("lsq",),
        refit_calib=calib,
        trials=2,
    )
    assert best.statistics == "subset" and best.samples and best.refit_calib == calib
    loaded, tokenizer = load_model(str(tmp_path / "model"))
    applied, fresh = copy.deepcopy(loaded), copy.deepcopy(loaded)
    plan = apply_study_plan(applied, best, tokenizer, progress=False).plan
    options = PruneOptions.from_best(best)
    assert options.refit_calib == calib and options.calib_addresses == [tuple(a) for a in best.addresses]
    sequential = replace(best, spec=best.prune_spec.with_(sequential=True).to_dict())
    assert PruneOptions.from_best(sequential).refit_calib is None  # sequential refits each layer on its windows
    assert prune_model(fresh, tokenizer, options, progress=False).plan == plan == best.prune_plan
    windows = calibration_samples(tokenizer, calib, 16).input_ids
    refit = refit_updates(loaded, plan, CalibrationPasses(windows, progress=False), "lsq", 0.3)
    for name, (weight, bias) in refit.items():
        torch.testing.assert_close(applied.get_submodule(name).weight, weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fresh.get_submodule(name).bias, bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--statistics", "refit", "--metrics", "act,fluct", "--refit-calib", "none"], "pass --refit-calib"),
        (["--refit-calib", "wiki:x"], "bad calibration spec 'wiki:x'"),
        (["--statistics", "some"], "--statistics: unknown choice 'some'"),
    ],
)
def test_refit_flags_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys, extra, message):
    code, _, err = run_cli(capsys, *search_args(tmp_path, tmp_path / "out", *extra))
    assert code == 2 and one_error_line(err, message)
    assert not (tmp_path / "out").exists()


def test_prune_refuses_a_bad_refit_spec_and_sequential_with_a_refit_pool(tmp_path, capsys):
    out = str(tmp_path / "out")
    code, _, err = run_cli(capsys, "prune", "--model", "smollm2", "--refit-calib", "wiki", "--out", out)
    assert code == 2 and "bad calibration spec 'wiki'" in err and "Traceback" not in err
    argv = ["prune", "--model", "smollm2", "--sequential", "--metric", "obs", "--refit-calib", "wiki:8", "--out", out]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and one_error_line(err, "drop --refit-calib")
    assert list(tmp_path.iterdir()) == []
