"""The search: subset encoding, trial objective, resumable multi-worker studies, and their errors."""

import math
import multiprocessing
import os
import signal
import statistics
import threading
from dataclasses import asdict, replace
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import save_file

from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.removal import apply_plan
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.evaluate import perplexity
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key
from adapruner.searching.search import (
    WORKER_ATTR,
    Objective,
    SearchSpace,
    TrialConfig,
    config_of,
    pool_blocks,
    round_robin,
    trial_plan,
)
from adapruner.searching.study import WorkerSpec, open_storage, open_study, run_worker, run_workers
from adapruner.searching.trial_scorer import ValidationScorer, shared_copy
from tests.helpers import wait_for
from tests.models import span

SEQ = 11
LAYERS = range(0, 3)
SPACE = SearchSpace(metrics=("l2", "taylor1", "taylor2", "vector"), sample_counts=(1, 2, 4), blocks_per_pool=2)


def tiny_cache(model, n=8):
    ids = torch.randint(0, 97, (n, SEQ), generator=torch.Generator().manual_seed(5))
    addresses = [("a" if i < n // 2 else "b", i) for i in range(n)]
    key = cache_key("tiny", model, CandidatePool(["a", "b"], n // 2, SEQ, 0), LAYERS, activations=True, dtype="float32")
    return build_cache(model, key, ids, addresses, progress=False)


def pruned_copy(model, cache, setting, config):
    pruned = shared_copy(model)
    apply_plan(pruned, trial_plan(model, cache, setting, config))
    return pruned


def test_blocks_and_round_robin(gqa_model):
    cache = tiny_cache(gqa_model)
    blocks = pool_blocks(cache, 2)
    assert blocks == {"a_0": [0, 1], "a_1": [2, 3], "b_0": [4, 5], "b_1": [6, 7]}
    assert round_robin([[0, 1], [6, 7]], 3) == [0, 1, 6]
    assert round_robin([[0], [6, 7]], 5) == [0, 6, 7]


def test_objective_value_is_the_validation_ppl_of_the_trial_config(gqa_model):
    cache = tiny_cache(gqa_model)
    val = torch.randint(0, 97, (4, SEQ), generator=torch.Generator().manual_seed(9))
    setting = PruneSpec(0.5, layers=span(LAYERS))
    objective = Objective(
        gqa_model, cache, setting, SPACE, ValidationScorer(gqa_model, val, LAYERS.start, batch_size=2)
    )
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True))
    study.optimize(objective, n_trials=6)
    for trial in study.trials:
        config = config_of(trial, cache, SPACE)
        assert config.samples == trial.user_attrs["samples"] and 1 <= len(config.samples) <= 4
        assert trial.value == pytest.approx(
            perplexity(pruned_copy(gqa_model, cache, setting, config), val, progress=False), rel=1e-6
        )
    dense = perplexity(gqa_model, val, progress=False)
    assert all(t.value != pytest.approx(dense) for t in study.trials)  # the dense model itself is untouched
    assert perplexity(gqa_model, val, progress=False) == dense


@pytest.mark.parametrize("early_stop", [False, True])
def test_early_stop_prunes_trials_worse_than_the_median_at_a_batch(gqa_model, early_stop):
    """Each validation batch reports the running perplexity; with early_stop the median rule stops a trial whose
    running value is worse than the median of earlier trials at that batch, before its last batch."""
    cache = tiny_cache(gqa_model)
    val = torch.randint(0, 97, (4, SEQ), generator=torch.Generator().manual_seed(9))
    scorer = ValidationScorer(gqa_model, val, LAYERS.start, batch_size=1)
    objective = Objective(gqa_model, cache, PruneSpec(0.5, layers=span(LAYERS)), SPACE, scorer, early_stop=early_stop)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), pruner=pruner)
    study.optimize(objective, n_trials=12)
    stopped = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    if not early_stop:
        assert not stopped and all(len(t.intermediate_values) == 4 for t in study.trials)
        return
    assert stopped
    for trial in stopped:
        step = max(trial.intermediate_values)
        assert step < 3  # stopped before the last batch
        done = [
            t.intermediate_values[step]
            for t in study.trials[: trial.number]
            if t.state == optuna.trial.TrialState.COMPLETE
        ]
        assert min(trial.intermediate_values.values()) > statistics.median(done)  # optuna's median rule, minimising


def test_depth_slope_changes_per_layer_sizes(gqa_model):
    cache = tiny_cache(gqa_model)
    config = TrialConfig([0, 1], "l2", "sum", slope=0.9, allocation="depth")
    pruned = pruned_copy(gqa_model, cache, PruneSpec(0.5, layers=span(LAYERS), prune_attention=False), config)
    sizes = [layer.mlp.gate_proj.out_features for layer in pruned.model.layers]
    assert sizes == [23, 12, 1]  # ratios 0.5·0.1, 0.5, 0.5·1.9 of 24 channels remove round(1.2), 12, round(22.8)


def test_storage_and_setup_errors(storage_url):
    with pytest.raises(AdaPrunerError, match="cannot open storage"):
        open_storage("nosuchdb://x/y")
    storage = open_storage(storage_url)
    open_study(storage, "s", {"model": "smollm2", "ratio": 0.25})
    with pytest.raises(AdaPrunerError, match="created with ratio=0.25, not 0.3"):
        open_study(storage, "s", {"model": "smollm2", "ratio": 0.3})


def test_journal_storage_runs_and_resumes(tmp_path, gqa_model, tokenizer):
    spec = worker_files(tmp_path, gqa_model, tokenizer, n_val=4)
    spec.storage, spec.n_trials = f"journal:{tmp_path}/study.log", 2
    run_worker(spec)
    spec.n_trials = 3
    run_worker(spec)  # resumes: one more trial
    study = optuna.load_study(study_name=spec.study, storage=open_storage(spec.storage))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    with pytest.raises(AdaPrunerError, match="created with model='tiny'"):
        open_study(open_storage(spec.storage), spec.study, {"model": "other"})


def worker_files(tmp_path, model, tokenizer, n_val, storage=None):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cache = tiny_cache(model)
    cache.save(tmp_path / "cache.safetensors")
    save_file(
        {"windows": torch.randint(0, 97, (n_val, SEQ), generator=torch.Generator().manual_seed(2))},
        str(tmp_path / "val.safetensors"),
    )
    return WorkerSpec(
        model=str(model_dir),
        cache_path=str(tmp_path / "cache.safetensors"),
        val_path=str(tmp_path / "val.safetensors"),
        storage=storage or f"sqlite:///{tmp_path}/study.db",
        study="s",
        setup={"model": "tiny"},
        spec=PruneSpec(0.5, layers="0:3"),
        space=asdict(SPACE),
        n_trials=8,
        sampler="tpe",
        seed=0,
        batch_size=4,
        threads=1,
        heartbeat_seconds=1,
        grace_seconds=2,
    )


def states(spec):
    """The study as another process sees it (through `open_storage`, which survives the schema-creation race)."""
    study = optuna.load_study(study_name=spec.study, storage=open_storage(spec.storage))
    return study, [t.state for t in study.get_trials(deepcopy=False)]


def test_two_workers_share_one_study(tmp_path, gqa_model, tokenizer, storage_url):
    spec = worker_files(tmp_path, gqa_model, tokenizer, n_val=8, storage=storage_url)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=run_worker, args=(replace(spec, worker_index=k, share=4),)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=240)
        assert w.exitcode == 0
    study, trial_states = states(spec)
    assert trial_states == [optuna.trial.TrialState.COMPLETE] * 8
    assert sorted(t.number for t in study.trials) == list(range(8))
    assert len({t.datetime_start for t in study.trials}) == 8


def trials_so_far(spec) -> list:
    """The study's trials as another process sees them; [] while the study does not exist yet."""
    if spec.storage.startswith("sqlite:///") and not Path(spec.storage.removeprefix("sqlite:///")).exists():
        return []  # opening it here would create the file and race the worker's schema creation
    try:
        study, _ = states(spec)
    except (KeyError, AdaPrunerError, optuna.exceptions.StorageInternalError):  # study not created yet
        return []
    return study.get_trials(deepcopy=False)


def mid_scoring(trial, spec, n_val: int) -> bool:
    """`trial` is RUNNING and has scored its first validation batch but not half of them: it holds all its parameters
    (a retry reruns them all) and a SIGKILL sent now lands inside its work, not after it."""
    batches = math.ceil(n_val / spec.batch_size)
    return trial.state == optuna.trial.TrialState.RUNNING and 1 <= len(trial.intermediate_values) <= batches // 2


def stale_trial_numbers(spec) -> list[int]:
    """The RUNNING trials whose heartbeat is older than the grace period, judged by the storage's own check, the one
    the next worker makes before it starts a trial."""
    storage = open_storage(spec.storage, spec.heartbeat_seconds, spec.grace_seconds)
    study_id = storage.get_study_id_from_name(spec.study)
    stale = set(storage._get_stale_trial_ids(study_id))
    return [t.number for t in storage.get_all_trials(study_id, deepcopy=False) if t._trial_id in stale]


def test_killed_worker_loses_nothing_and_its_trial_is_retried(tmp_path, gqa_model, tokenizer, storage_url):
    n_val = 3000  # ~1 s per trial, long enough to kill mid-trial
    spec = worker_files(tmp_path, gqa_model, tokenizer, n_val=n_val, storage=storage_url)
    spec.n_trials = 4
    worker = multiprocessing.get_context("spawn").Process(target=run_worker, args=(spec,))
    worker.start()

    def second_trial_mid_scoring():
        trials = trials_so_far(spec)
        if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
            return next((t for t in trials if mid_scoring(t, spec, n_val)), None)
        return None

    try:
        target = wait_for(
            second_trial_mid_scoring, 240, "a trial after the first running with half its batches left", interval=0.2
        )
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
    killed_number = target.number
    running = [t.number for t in trials_so_far(spec) if t.state == optuna.trial.TrialState.RUNNING]
    assert running == [killed_number], f"the kill did not land inside trial {killed_number}: running {running}"
    wait_for(
        lambda: stale_trial_numbers(spec) == [killed_number],
        spec.grace_seconds + 60,
        f"the heartbeat of trial {killed_number} to go stale ({spec.grace_seconds} s grace)",
        interval=0.2,
    )
    run_worker(spec)
    study, _ = states(spec)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    assert len(complete) == 4
    assert [t.number for t in failed] == [killed_number]
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retried) == 1 and retried[0].params == failed[0].params


def test_a_helper_killed_mid_trial_has_its_trial_rerun_by_the_parent(tmp_path, gqa_model, tokenizer, storage_url):
    """Two workers; the helper is SIGKILLed while it runs a trial: no grace period, the search still ends with
    the asked number of finished trials, the killed trial is FAIL and rerun once with its parameters."""
    n_val = 3000  # ~1 s per trial
    spec = worker_files(tmp_path, gqa_model, tokenizer, n_val=n_val, storage=storage_url)
    spec.n_trials, spec.heartbeat_seconds, spec.grace_seconds = 6, 60, 600  # only the parent's check can retry it
    killed, searched = {}, threading.Event()

    def helper_trial_mid_scoring():
        if searched.is_set():
            raise AssertionError("the search ended before the helper ran a trial with half its batches left")
        for trial in trials_so_far(spec):
            pid = int(trial.user_attrs.get(WORKER_ATTR, "-:0").rsplit(":", 1)[1])
            if pid and pid != os.getpid() and trial.number >= 1 and mid_scoring(trial, spec, n_val):
                return trial.number, pid
        return None

    def kill_the_helper_mid_trial():
        try:
            number, pid = wait_for(
                helper_trial_mid_scoring, 240, "a helper's trial running with half its batches left", interval=0.2
            )
        except Exception as exc:  # reported by the assertion below, not lost in this thread
            killed["error"] = f"{type(exc).__name__}: {exc}"
            return
        os.kill(pid, signal.SIGKILL)
        killed["number"] = number

    threads = torch.get_num_threads()
    watcher = threading.Thread(target=kill_the_helper_mid_trial)
    watcher.start()
    notes = []
    try:
        run_workers(spec, 2, report=notes.append)
    finally:
        searched.set()
        watcher.join()
        torch.set_num_threads(threads)
    assert "number" in killed, killed.get("error")
    study, _ = states(spec)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    assert len(complete) == 6
    assert [t.number for t in failed] == [killed["number"]]
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed["number"]]
    assert len(retried) == 1 and retried[0].params == failed[0].params
    assert (
        len(notes) == 1
        and notes[0].startswith("note: worker 1 (pid")
        and f"its trial {killed['number']} runs again" in notes[0]
    )


def _open_new_study(url):
    open_study(open_storage(url), "s", {"model": "tiny"})


def test_workers_opening_one_new_database_at_once_all_succeed(tmp_path):
    """Schema creation races (sqlite IntegrityError on alembic_version) are retried, not reported."""
    context = multiprocessing.get_context("spawn")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path}/race{round_}.db"
        workers = [context.Process(target=_open_new_study, args=(url,)) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert [w.exitcode for w in workers] == [0, 0, 0, 0]


def test_a_resumed_study_does_not_redraw_the_parameters_it_ran(tmp_path, gqa_model, tokenizer):
    spec = worker_files(tmp_path, gqa_model, tokenizer, n_val=2)
    spec.storage, spec.n_trials = f"journal:{tmp_path}/study.log", 3
    run_worker(spec)
    spec.n_trials = 6
    run_worker(spec)  # resumes with a sampler seeded by the 3 trials it holds
    study = optuna.load_study(study_name=spec.study, storage=open_storage(spec.storage))
    drawn = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(drawn) == 6 and all(
        first != resumed for first, resumed in zip(drawn[:3], drawn[3:])
    )  # no replay of the seed
    ran = [d for d, t in zip(drawn, study.trials) if "repeat_of" not in t.user_attrs]
    assert len(set(ran)) == len(ran)  # no parameter set ran twice; a chance repeat takes the earlier result
    for trial in study.trials:
        if "repeat_of" in trial.user_attrs:
            earlier = study.trials[trial.user_attrs["repeat_of"]]
            assert earlier.params == trial.params and earlier.value == trial.value
