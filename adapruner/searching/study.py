"""Optuna storage, study set-up and search workers: resumable, several processes (or machines) per study.

Storage is any Optuna URL (`sqlite:///…`, `postgresql://…`, `mysql://…`) or `journal:PATH` for a journal file.
RDB storages run a heartbeat: a worker killed mid-trial leaves a stale RUNNING trial, which the next worker
marks FAIL and `RetryHeartbeatStaleTrialCallback` enqueues again with the same parameters, so nothing is lost.
"""

from __future__ import annotations

import copy
import multiprocessing
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
import torch
from safetensors.torch import load_file

from adapruner.choosing.spec import PruneSpec
from adapruner.errors import AdaPrunerError, first_line
from adapruner.interrupts import interruptible, interrupts_deferred, raise_pending
from adapruner.model.structure import decoder_layers, parse_layer_range
from adapruner.scoring.cache import ActivationCache, DamagedCache
from adapruner.scoring.refit_pool import RefitPool
from adapruner.searching.search import WORKER_ATTR, Objective, SearchSpace, worker_name
from adapruner.searching.search_options import SearchOptions, startup_trials, study_setup
from adapruner.searching.storage_urls import MASK, missing_driver, passwords, shown_url
from adapruner.searching.trial_scorer import ValidationScorer

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20
MAX_RETRY = 3
OPEN_ATTEMPTS = 5
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def open_storage(url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS, grace_seconds: int = GRACE_SECONDS):
    """An Optuna storage for `url`; a one-line error when it cannot be opened (the URL shown by `shown_url`).

    Workers that open one new database at the same moment race to create its schema; the loser retries.
    """
    from sqlalchemy.exc import DBAPIError

    missing = missing_driver(url)
    if missing is not None:
        install = "pip install 'adapruner[postgres]'" if url.startswith("postgresql") else "install it"
        raise AdaPrunerError(
            f"cannot open storage {shown_url(url)!r}: its database driver {missing!r} is not installed: {install}, "
            "or name an installed driver in the URL (e.g. postgresql+psycopg2://)"
        )
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return _storage(url, heartbeat_seconds, grace_seconds)
        except DBAPIError as exc:
            if attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            _refuse(url, exc)
        except Exception as exc:  # optuna/sqlalchemy raise many types for a bad URL
            _refuse(url, exc)


def _storage(url: str, heartbeat_seconds: int, grace_seconds: int):
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    with warnings.catch_warnings():  # heartbeats are marked experimental; we rely on them knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_seconds,
            grace_period=grace_seconds,
            heartbeat_stale_trial_callback=retry_callback(),
        )


def retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Enqueues a failed trial again with its parameters (system attribute `failed_trial`),
    at most `MAX_RETRY` times."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def _refuse(url: str, exc: Exception):
    reason = first_line(exc)
    for secret in passwords(url):
        reason = reason.replace(secret, MASK)
    raise AdaPrunerError(
        f"cannot open storage {shown_url(url)!r} ({reason}): "
        "pass a URL like sqlite:///path/study.db or journal:path/study.log"
    ) from None


def open_study(storage, name: str, setup: dict, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create or resume study `name`; refuse one created with a different set-up (model, ratio, pools, …)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is ours (tqdm); optuna's INFO lines repeat it
    study = optuna.create_study(
        storage=storage, study_name=name, direction="minimize", sampler=sampler, load_if_exists=True
    )
    existing = study.user_attrs.get("setup")
    if existing is not None and "spec" in setup and "spec" not in existing and "ratio" in existing:
        raise AdaPrunerError(
            f"study {name!r} was made by an older adapruner (its set-up holds no pruning spec): "
            "run the search with a new --out or --study"
        )
    if existing is not None and isinstance(existing.get("spec"), dict):  # spec fields added later hold their defaults
        existing = {**existing, "spec": {**asdict(PruneSpec()), **existing["spec"]}}
    if existing is not None and "structure" in setup and "structure" not in existing:  # made before structure searches
        existing = {"structure": "config", **existing}
    if existing is not None and "front" in setup and "front" not in existing:  # a widths study made before --front
        existing = {**existing, "front": []}
    if existing is None:
        study.set_user_attr("setup", setup)
    elif existing != setup:
        key, was, now = _first_difference(existing, setup)
        raise AdaPrunerError(
            f"study {name!r} was created with {key}={was!r}, not {now!r}: pass the same options or a new --study"
        )
    return study


def _first_difference(old: dict, new: dict) -> tuple[str, object, object]:
    """(key, old value, new value) of the first differing entry, looking inside nested settings (the pruning spec)."""
    key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
        return _first_difference(old[key], new[key])
    return key, old.get(key), new.get(key)


def pin_content(study: optuna.Study, content: dict) -> None:
    """Record the digests of the model and texts a study searches (`fingerprint`); refuse to resume it over
    other contents (a model or pool file changed at the same path)."""
    existing = study.user_attrs.get("content")
    if existing is None:
        study.set_user_attr("content", content)
    elif existing != content:
        changed = next((k for k in content if existing.get(k) != content[k]), "contents")
        what = {
            "model": "model (weights, config or tokenizer)",
            "pools": "pool texts",
            "validation": "validation text",
        }.get(changed, changed)
        raise AdaPrunerError(
            f"study {study.study_name!r} was run on another {what}: "
            f"digest {existing.get(changed)}, now {content[changed]}; "
            "pass a new --study or --out"
        )


def make_sampler(kind: str, seed: int, startup_trials: int = 10) -> optuna.samplers.BaseSampler:
    """TPE (multivariate, `startup_trials` random trials first) or random sampling."""
    if kind == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=startup_trials)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise AdaPrunerError(f"unknown sampler {kind!r}: use tpe or random")


@dataclass
class WorkerSpec:
    """Everything a worker process needs; plain data so that it crosses a process boundary."""

    model: str
    cache_path: str
    val_path: str
    storage: str
    study: str
    setup: dict
    spec: PruneSpec  # the study's fixed part; each trial adds its choices
    space: dict
    n_trials: int
    sampler: str
    seed: int
    startup_trials: int = 10
    val_dtype: str = "float32"
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    batch_size: int = 8
    early_stop: bool = False
    threads: int = 0
    heartbeat_seconds: int = HEARTBEAT_SECONDS
    grace_seconds: int = GRACE_SECONDS
    worker_index: int = 0
    share: int | None = None  # trials this worker runs at most (None: until the study holds n_trials)
    refit_path: str | None = None  # the search's refit pool (`adapruner.scoring.refit_pool`), if it has one

    @classmethod
    def of(cls, options: SearchOptions, layers: range, storage: str, files: dict[str, str | None]) -> WorkerSpec:
        """What the workers of a search with `options` run: the study (its set-up, its spec on the resolved `layers`,
        its space) and how it runs, all from `options`; the storage URL and the files the search wrote (cache_path,
        val_path, refit_path) as given. Threads are shared out among the workers."""
        return cls(
            model=options.model,
            storage=storage,
            study=options.study,
            setup=study_setup(options),
            spec=options.spec.with_(layers=f"{layers.start}:{layers.stop}"),
            space=asdict(options.space),
            n_trials=options.trials,
            sampler=options.sampler,
            seed=options.seed,
            startup_trials=startup_trials(options),
            val_dtype=options.val_dtype,
            batch_size=options.batch_size,
            early_stop=options.early_stop,
            device=options.device,
            dtype=options.dtype,
            trust_remote_code=options.trust_remote_code,
            threads=max(1, torch.get_num_threads() // options.workers),
            **files,
        )


def run_worker(
    spec: WorkerSpec,
    callbacks: list | None = None,
    model=None,
    cache: ActivationCache | None = None,
    refit: RefitPool | None = None,
) -> optuna.Study:
    """Run up to `share` trials, stopping early once the study holds `n_trials` finished ones (every worker's).

    A caller that holds the model, cache and refit pool already passes them; a spawned worker loads them (the cache
    memory-mapped, so workers on one machine share its pages).
    """
    from adapruner.devices import DTYPES
    from adapruner.model.models import load_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    model = (
        model
        if model is not None
        else load_model(spec.model, DTYPES[spec.dtype], spec.device, spec.trust_remote_code)[0]
    )
    if cache is None:
        try:
            cache = ActivationCache.load(Path(spec.cache_path))  # memory-mapped, shared
        except DamagedCache as exc:
            raise AdaPrunerError(
                f"activation cache {spec.cache_path} is damaged ({exc}): run the search again to rebuild it"
            ) from None
    if refit is None and spec.refit_path is not None:
        refit = RefitPool.load(Path(spec.refit_path))
    val_windows = load_file(spec.val_path)["windows"]
    start = parse_layer_range(spec.spec.layers, len(decoder_layers(model))).start
    scorer = ValidationScorer(model, val_windows, start, spec.val_dtype, spec.batch_size)
    objective = Objective(
        model, cache, spec.spec, SearchSpace(**spec.space), scorer, spec.early_stop, spec.startup_trials, refit
    )
    storage = open_storage(spec.storage, spec.heartbeat_seconds, spec.grace_seconds)
    study = open_study(storage, spec.study, spec.setup)
    # seeded by worker and by the trials the study holds: a resumed study does not redraw the parameters it ran
    study.sampler = make_sampler(
        spec.sampler, spec.seed + 1000 * spec.worker_index + len(study.get_trials(deepcopy=False)), spec.startup_trials
    )
    limit = optuna.study.MaxTrialsCallback(spec.n_trials, states=COUNTED)
    remaining = spec.n_trials - finished(study)
    if remaining > 0:
        n = remaining if spec.share is None else min(spec.share, remaining)
        # a signal waits while optuna starts, records and ends a trial (see `interrupts_deferred`); it stops the
        # objective at once, or the loop right after a trial
        with interrupts_deferred():
            study.optimize(
                interruptible(objective),
                n_trials=n,
                callbacks=[limit, *(callbacks or []), raise_pending],
                catch=(AdaPrunerError,),
            )
    return study


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def retry_trials_of(study: optuna.Study, worker: str) -> list[int]:
    """Mark the RUNNING trials of the dead `worker` FAIL and enqueue each again with its parameters, as a stale
    heartbeat would (no grace period to wait, and journal storages too). Returns the failed trials' numbers."""
    storage, retry = study._storage, retry_callback()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) != worker:
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                failed.append(trial.number)
                retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
        except (
            optuna.exceptions.UpdateFinishedTrialError
        ):  # its heartbeat went stale first and another worker failed it
            pass
    return failed


def worker_device(device: str, index: int) -> str:
    """Worker `index`'s device: on a machine with several GPUs, worker k runs on GPU (first + k) mod count, so that
    `--workers N` on N GPUs gives one worker per GPU; a CPU search keeps every worker on the CPU."""
    if not device.startswith("cuda") or torch.cuda.device_count() < 2:
        return device
    first = torch.device(device).index or 0
    return f"cuda:{(first + index) % torch.cuda.device_count()}"


def run_workers(
    base: WorkerSpec,
    workers: int,
    callbacks: list | None = None,
    model=None,
    cache: ActivationCache | None = None,
    report=print,
    refit: RefitPool | None = None,
) -> optuna.Study:
    """Run the study to `base.n_trials` finished trials with `workers` processes: this one and `workers - 1`
    spawned helpers, sharing the remaining trials. A helper that exits non-zero has its running trial failed and
    retried with the same parameters here, and this process runs the trials it left; if the study still holds
    fewer than asked, the error names the dead workers."""
    storage = open_storage(base.storage, base.heartbeat_seconds, base.grace_seconds)
    remaining = max(0, base.n_trials - finished(open_study(storage, base.study, base.setup)))
    shares = [remaining // workers + (k < remaining % workers) for k in range(workers)]
    context = multiprocessing.get_context("spawn")
    helpers = [
        context.Process(
            target=run_worker,
            args=(replace(base, worker_index=k, share=shares[k], device=worker_device(base.device, k)),),
        )
        for k in range(1, workers)
    ]
    for process in helpers:
        process.start()
    try:
        study = run_worker(replace(base, share=shares[0]), callbacks, model, cache, refit)
        for process in helpers:
            process.join()
    finally:  # this process stopped early (error, SIGINT/SIGTERM): take the helpers down with it
        for process in helpers:
            if process.is_alive():
                process.terminate()
                process.join()
    dead = [(k, process) for k, process in enumerate(helpers, start=1) if process.exitcode != 0]
    for k, process in dead:
        retried = retry_trials_of(study, worker_name(process.pid))
        report(
            f"note: worker {k} (pid {process.pid}) exited with code {process.exitcode}; "
            f"{'its trial ' + ', '.join(map(str, retried)) + ' runs again' if retried else 'it held no running trial'}"
        )
    if dead and finished(study) < base.n_trials:
        study = run_worker(replace(base, share=None), callbacks, model, cache, refit)
    if dead and finished(study) < base.n_trials:
        names = ", ".join(f"worker {k} (exit code {process.exitcode})" for k, process in dead)
        raise AdaPrunerError(
            f"the study holds {finished(study)} of {base.n_trials} finished trials ({names}): "
            "run the same command again to resume"
        )
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    if (
        failed and finished(study) < base.n_trials
    ):  # trials that raised AdaPrunerError (e.g. a budget out of reach for them)
        report(f"note: {len(failed)} trials failed (optuna's warnings above give each error); the others are reported")
    return study
