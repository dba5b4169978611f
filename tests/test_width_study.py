"""The structure search as an Optuna study (issue 33): one trial per structure scored, each within the budget; the
best COMPLETE trial is the evolution's parent, scored on every window; a resumed study replays the evolution from its
trials without scoring them again and ends where an uninterrupted one ends."""

import copy
import math

import optuna
import pytest
import torch

from adapruner.choosing.allocation import count_params, removed_by
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.removal import cut
from adapruner.evaluation.divergence import dense_top_k, mean_kl
from adapruner.scoring.sources import CalibrationPasses
from adapruner.searching.evolution import Stages
from adapruner.searching.trial_scorer import ValidationScorer
from adapruner.searching.width_study import WidthSearch, WidthStudy, best_structure, units_of
from tests.helpers import FAMILY_TYPES, MOE_TYPES, tiny_family
from tests.models import tiny_llama

SPEC = PruneSpec(None, target_params=0.2, metric="fluct", allocation="loss", compensation="lsq", granularity="query")


def width_study(model, trials=8, objective="kl", front=(), spec=SPEC):
    ids = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(3))
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(4))
    search = WidthSearch(Stages((2, 6), (2,)), children=4, trials=trials, objective=objective, front=front)
    return WidthStudy(model, spec, CalibrationPasses(ids, progress=False), windows, search, batch_size=4), windows


def new_study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="minimize")


def test_each_structure_is_a_trial_within_the_budget_and_the_best_is_the_parent_on_every_window():
    model = tiny_llama(6, 2, layers=4)
    searched, windows = width_study(model)
    study = new_study()
    result = searched.run(study, progress=False)
    trials = study.get_trials(deepcopy=False)
    # a trial per structure and stage reached: one dropped early may come back later and go further
    assert len({(tuple(sorted(t.params.items())), len(t.user_attrs["chunks"])) for t in trials}) == len(trials)
    assert trials[0].user_attrs["generation"] == 0 and trials[0].state == optuna.trial.TrialState.COMPLETE
    for trial in trials:
        counts = searched.space.layer_counts(units_of(trial.params, searched.space))
        assert removed_by(model, counts, "query") >= searched.space.target
        assert PrunePlan.decode(trial.user_attrs["plan"]) == searched.variants.plan(counts)
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        assert len(trial.user_attrs["chunks"]) == (2 if complete else 1)
        assert max(trial.intermediate_values) == (6 if complete else 2)
    best, result = best_structure(study), result[SPEC.target_params]
    assert searched.space.layer_counts(units_of(best.params, searched.space)) == result.best
    assert best.value == result.history[-1] < trials[0].value
    plan, updates = searched.plan_and_updates(units_of(best.params, searched.space))
    assert math.isclose(ValidationScorer(model, windows, 0, batch_size=4).kl(plan, updates), best.value, rel_tol=1e-5)


def test_a_resumed_study_scores_nothing_twice_and_ends_where_an_uninterrupted_one_ends():
    model = tiny_llama(6, 2, layers=4)
    whole, _windows = width_study(model, trials=12)
    uninterrupted = new_study()
    whole.run(uninterrupted, progress=False)

    first, _windows = width_study(model, trials=4)
    resumed = new_study()
    first.run(resumed, progress=False)
    before = len(resumed.trials)
    again, _windows = width_study(model, trials=12)
    calls = []
    score = again.score
    again.score = lambda counts, chunk: calls.append(counts) or score(counts, chunk)
    again.run(resumed, progress=False)
    assert len(calls) == sum(len(t.user_attrs["chunks"]) for t in resumed.trials[before:])  # only new structures
    assert [t.params for t in resumed.trials] == [t.params for t in uninterrupted.trials]
    assert best_structure(resumed).params == best_structure(uninterrupted).params


def widths_search(tmp_path, model, **options):
    """A tiny `search --structure widths` (3 children per generation, 2 generations) on a random pool."""
    from tests.helpers import tiny_search

    settings = {
        "structure": "widths",
        "spec": PruneSpec(None, target_params=0.2, layers="all", granularity="query", damp=0.3),
        "metrics": ("act", "fluct"),
        "allocations": ("uniform", "loss"),
        "compensations": ("lsq",),
        "statistics": ("refit",),
        "refit_calib": f"{tmp_path / 'a.txt'}:4",
        "stages": (2, 4),
        "survivors": (2,),
        "children": 3,
        "trials": 6,
    }
    return tiny_search(tmp_path, model, **settings | options)


def test_a_widths_search_delivers_the_structure_it_scored(tmp_path):
    from safetensors.torch import load_file

    from adapruner.cutting.pruning import apply_study_plan
    from adapruner.evaluation.evaluate import perplexity
    from adapruner.model.models import load_model

    best = widths_search(tmp_path, tiny_llama(6, 2, layers=4))
    assert (best.structure, best.sampler, best.statistics) == ("widths", "evolution", "refit")
    spec = best.prune_spec
    assert (spec.metric, spec.allocation, spec.compensation) == ("fluct", "loss", "lsq")  # the preferred of each
    assert {"best.json", "trials.txt", "history.png", "widths.png"} <= {p.name for p in (tmp_path / "s").iterdir()}
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    assert best_structure(study).number == best.trial and best.val_kl == best_structure(study).value
    assert len(study.trials) >= 2
    assert all(p.name.startswith("refit-") for p in (tmp_path / "cache").iterdir())  # no activation cache built
    model, tokenizer = load_model(str(tmp_path / "model"))
    windows = load_file(str(tmp_path / "s" / "val.safetensors"))["windows"]
    assert windows.shape[0] == 4  # the last stage's
    dense = dense_top_k(model, windows, batch_size=8)
    apply_study_plan(model, best, tokenizer, progress=False)
    assert math.isclose(mean_kl(model, windows, dense, 8), best.val_kl, rel_tol=1e-5)
    assert math.isclose(perplexity(model, windows, 8, progress=False), best.val_ppl, rel_tol=1e-5)
    assert abs(best.removed_fraction - 0.2) < 0.02


def test_widths_options_are_checked_before_the_model_loads(tmp_path):
    from adapruner.errors import AdaPrunerError
    from adapruner.searching.search_options import SearchOptions

    with pytest.raises(AdaPrunerError, match="pass --target-params"):
        widths_search(tmp_path, tiny_llama(6, 2, layers=4), spec=PruneSpec(0.2))
    with pytest.raises(AdaPrunerError, match="pass --refit-calib"):
        widths_search(tmp_path, tiny_llama(6, 2, layers=4), refit_calib=None)
    with pytest.raises(AdaPrunerError, match="pass --workers 1"):
        widths_search(tmp_path, tiny_llama(6, 2, layers=4), workers=2)
    with pytest.raises(AdaPrunerError, match="does not search --structure widths"):
        SearchOptions(structure="widths", sampler="tpe")
    with pytest.raises(AdaPrunerError, match="does not search --structure config"):
        SearchOptions(sampler="evolution")
    with pytest.raises(AdaPrunerError, match="must grow"):
        SearchOptions(structure="widths", stages=(64, 16))
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("model_type", [*FAMILY_TYPES, *MOE_TYPES])
def test_a_three_trial_structure_search_runs_on_every_family(model_type):
    """Whole blocks may go (min_keep 0); the best structure, cut from a fresh copy, scores what its trial did. MoE
    experts are scored from their weights alone, so there the search spreads attention heads."""
    model = tiny_family(model_type)
    ids = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(3))
    windows = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(4))
    search = WidthSearch(Stages((2, 4), (1,)), children=3, trials=3)
    spec = SPEC.with_(min_keep=0.0, layers="all")
    if model_type in MOE_TYPES:
        spec = spec.with_(prune_mlp=False, target_params=0.03)
    searched = WidthStudy(model, spec, CalibrationPasses(ids, progress=False), windows, search, batch_size=4)
    study = new_study()
    searched.run(study, progress=False)
    assert len(study.trials) >= 2
    for trial in study.trials:
        counts = searched.space.layer_counts(units_of(trial.params, searched.space))
        assert removed_by(model, counts, "query") >= searched.space.target
    best = best_structure(study)
    plan, updates = searched.plan_and_updates(units_of(best.params, searched.space))
    pruned = copy.deepcopy(model)
    cut(pruned, plan, updates)
    dense = dense_top_k(model, windows, batch_size=4)
    assert math.isclose(mean_kl(pruned, windows, dense, 4), best.value, rel_tol=1e-5, abs_tol=1e-8)  # fp32 KL


def test_studies_and_best_files_of_earlier_versions_still_open(tmp_path):
    """A config study made before structure searches (no `structure` in its set-up) resumes, and a config search's
    set-up leaves the structure search's own fields out; a best.json of format /6 reads as a config search's."""
    import dataclasses
    import json

    from adapruner.searching.best_trial import BestTrial
    from adapruner.searching.search_options import WIDTHS_ONLY, SearchOptions, study_setup
    from adapruner.searching.study import open_study

    setup = study_setup(SearchOptions())
    assert setup["structure"] == "config" and not set(WIDTHS_ONLY) & set(setup)
    assert set(WIDTHS_ONLY) <= set(study_setup(SearchOptions(structure="widths")))
    storage = optuna.storages.InMemoryStorage()
    open_study(storage, "old", {k: v for k, v in setup.items() if k != "structure"})
    open_study(storage, "old", setup)  # no refusal
    fields = {f.name: None for f in dataclasses.fields(BestTrial)} | {"plan": {}, "spec": {}}
    old = {k: v for k, v in fields.items() if k not in ("structure", "val_kl")} | {"format": "adapruner.best/6"}
    (tmp_path / "best.json").write_text(json.dumps(old))
    read = BestTrial.read(tmp_path / "best.json")
    assert (read.structure, read.val_kl, read.format) == ("config", None, "adapruner.best/7")


def test_a_non_finite_score_is_the_worst_not_an_error():
    model = tiny_llama(6, 2, layers=4)
    searched, _windows = width_study(model)
    searched.scorers[0].kl = lambda plan, updates: float("nan")
    assert searched.score(searched.start, 0) == math.inf


def test_a_front_searches_each_budget_as_a_search_of_that_budget_alone():
    """Each budget's evolution starts from its own loss allocation with the same seed: its trials (structures,
    scores, order) are those of a study searching that budget alone, and each meets its budget."""
    model = tiny_llama(6, 2, layers=4)
    searched, _windows = width_study(model, trials=8, front=(0.1, 0.2))
    front = new_study()
    searched.run(front, progress=False)
    assert {t.user_attrs["budget"] for t in front.trials} == {0.1, 0.2}
    for budget in (0.1, 0.2):
        alone, _windows = width_study(model, trials=8, spec=SPEC.with_(target_params=budget))
        single = new_study()
        alone.run(single, progress=False)
        at = [t for t in front.trials if t.user_attrs["budget"] == budget]
        assert [(t.params, t.value, t.state) for t in at] == [(t.params, t.value, t.state) for t in single.trials]
        assert best_structure(front, budget).params == best_structure(single).params
        for trial in at:
            counts = searched.space_at(budget).layer_counts(units_of(trial.params, searched.space))
            assert removed_by(model, counts, "query") >= searched.space_at(budget).target
    assert searched.space_at(0.1).target < searched.space_at(0.2).target


def test_a_front_delivers_the_structure_scored_at_each_budget(tmp_path):
    """front.json holds the best structure of each budget; `prune --from-study DIR --target-params p` delivers the
    one at p, and its KL and perplexity are what the search scored; another budget is a one-line error."""
    import json

    from safetensors.torch import load_file

    from adapruner.commands.prune import read_best_trial
    from adapruner.cutting.pruning import apply_study_plan
    from adapruner.errors import AdaPrunerError
    from adapruner.evaluation.evaluate import perplexity
    from adapruner.model.models import load_model
    from adapruner.searching.front import read_front

    spec = PruneSpec(None, target_params=None, layers="all", granularity="query", damp=0.3)
    best = widths_search(tmp_path, tiny_llama(6, 2, layers=4), spec=spec, front=(0.1, 0.2))
    folder = tmp_path / "s"
    assert {"front.json", "front.png", "best.json"} <= {p.name for p in folder.iterdir()}
    assert "the front" in (folder / "trials.txt").read_text()
    points = read_front(folder / "front.json")
    assert [p.prune_spec.target_params for p in points] == [0.1, 0.2]
    assert best.prune_spec.target_params == 0.2 and best == points[1]  # best.json: the last budget by default
    study = optuna.load_study(study_name="adapruner", storage=f"sqlite:///{folder / 'study.db'}")
    windows = load_file(str(folder / "val.safetensors"))["windows"]
    sizes = []
    for point in points:
        budget = point.prune_spec.target_params
        assert read_best_trial(folder, str(tmp_path / "model"), budget) == point
        assert (
            point.trial == best_structure(study, budget).number and point.val_kl == best_structure(study, budget).value
        )
        assert abs(point.removed_fraction - budget) < 0.02
        model, tokenizer = load_model(str(tmp_path / "model"))
        dense = dense_top_k(model, windows, batch_size=8)
        apply_study_plan(model, point, tokenizer, progress=False)
        assert math.isclose(mean_kl(model, windows, dense, 8), point.val_kl, rel_tol=1e-5)
        assert math.isclose(perplexity(model, windows, 8, progress=False), point.val_ppl, rel_tol=1e-5)
        sizes.append(count_params(model))
    with pytest.raises(AdaPrunerError, match="searched --target-params 0.1,0.2, not 0.15: pass one of them"):
        read_best_trial(folder, str(tmp_path / "model"), 0.15)
    from adapruner.cli import main

    args = ["prune", "--model", str(tmp_path / "model"), "--from-study", str(folder), "--no-eval", "--device", "cpu"]
    assert main([*args, "--target-params", "0.1", "--out", str(tmp_path / "p")]) == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["study_val_ppl"] == points[0].val_ppl
    assert report["params_after"] == sizes[0] > sizes[1]  # the 0.1 point's model, not best.json's


def test_front_options_are_checked_before_the_model_loads(tmp_path, capsys):
    from adapruner.cli import main
    from adapruner.errors import AdaPrunerError
    from adapruner.searching.search_options import SearchOptions

    with pytest.raises(AdaPrunerError, match="add --structure widths"):
        SearchOptions(front=(0.2, 0.3))
    with pytest.raises(AdaPrunerError, match="pass one of --front's 0.2,0.3"):
        SearchOptions(structure="widths", spec=PruneSpec(None, target_params=0.25), front=(0.2, 0.3))
    with pytest.raises(AdaPrunerError, match="list growing budgets"):
        SearchOptions(structure="widths", front=(0.3, 0.2))
    assert SearchOptions(structure="widths", front=(0.2, 0.3)).spec.target_params == 0.3
    for bad, message in (("0.2,x", "comma-separated fractions"), ("0.2,1.5", "must lie in")):
        args = ["search", "--model", str(tmp_path / "none"), "--structure", "widths", "--front", bad]
        assert main([*args, "--out", str(tmp_path / "s")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_widths_study_made_before_fronts_resumes(tmp_path):
    from adapruner.searching.search_options import SearchOptions, study_setup
    from adapruner.searching.study import open_study

    setup = study_setup(SearchOptions(structure="widths", spec=PruneSpec(None, target_params=0.2)))
    storage = optuna.storages.InMemoryStorage()
    open_study(storage, "old", {k: v for k, v in setup.items() if k != "front"})
    open_study(storage, "old", setup)  # no refusal
