"""`adapruner search`: cache → Optuna study (one or more worker processes) → best.json, table and plots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from adapruner.choosing.allocation_rules import any_output_fisher, any_refit_error
from adapruner.choosing.plan import PrunePlan
from adapruner.commands.structure_search import check_width_options, run_width_search
from adapruner.cutting.layout_check import check_family_layout
from adapruner.data.calibration import parse_calib_spec, pool_windows, seeded_draw
from adapruner.devices import DTYPES, Placement, dtype_name
from adapruner.errors import AdaPrunerError
from adapruner.fingerprint import model_digest, text_digest
from adapruner.kernels.dispatch import kernel_backend, scoring_backend
from adapruner.model.big_model import Dispatch
from adapruner.model.families import check_attention_pruning
from adapruner.model.models import cache_root, load_placed, load_shapes
from adapruner.model.structure import check_context, decoder_layers, has_experts, parse_layer_range
from adapruner.output.report import format_table, write_json_atomic
from adapruner.scoring.cache import CacheKey, CandidatePool, cache_key, load_or_build, planned_bytes
from adapruner.scoring.importance import check_expert_metrics
from adapruner.scoring.metrics import ACTIVATION_METRICS
from adapruner.scoring.refit_pool import load_or_collect, refit_key, refit_pool_bytes, scored_by_moments
from adapruner.searching.best_trial import BestTrial
from adapruner.searching.memory_plan import GIB, MemoryPlan, memory_plan
from adapruner.searching.search import SearchSpace, config_of, trial_spec
from adapruner.searching.search_options import STUDY_FILE, SearchOptions, search_record, study_setup
from adapruner.searching.storage_urls import shown_options, shown_url
from adapruner.searching.study import (
    COUNTED,
    WorkerSpec,
    finished,
    open_storage,
    open_study,
    pin_content,
    run_workers,
)
from adapruner.searching.trial_scorer import resolve_val_dtype
from adapruner.searching.widths import structure_bytes
from adapruner.staging import check_writable, staged_file


def needs_activations(options: SearchOptions) -> bool:
    """The cache stores X and dY when a metric needs them (taylor1, mix; obs: X's Gram), lsq compensation or the
    error/loss allocations need X's Gram (loss: dY's squares too)."""
    return (
        bool(ACTIVATION_METRICS & set(options.metrics))
        or "lsq" in options.compensations
        or any_refit_error(options.allocations)
    )


def cache_folder(options: SearchOptions) -> Path:
    return Path(options.cache_dir) if options.cache_dir else cache_root() / "activations"


def resolved(options: SearchOptions) -> tuple[SearchOptions, Placement]:
    """The options with `auto` device, dtype and validation dtype resolved for this machine."""
    placement = Placement.of(
        options.device,
        options.dtype,
        options.trust_remote_code,
        Dispatch.of(options.device_map, options.max_memory, options.offload_dir),
    )
    dtype = dtype_name(placement.dtype)
    if placement.dispatch is not None:  # trials share the spread model's tensors, so they validate in its dtype
        if options.val_dtype not in ("auto", dtype):
            raise AdaPrunerError(
                "a model spread by --device-map validates in its own dtype: "
                f"drop --val-dtype or pass --val-dtype {dtype}"
            )
        if options.workers > 1:
            raise AdaPrunerError(
                "--device-map spreads one model over this machine's devices: "
                "pass --workers 1 (more machines join with --storage)"
            )
        val_dtype = dtype
    else:
        val_dtype = resolve_val_dtype(options.val_dtype, placement.device)
    windows = options.stages[-1] if options.structure == "widths" else options.val_windows  # widths: every stage's
    return (
        replace(options, device=str(placement.device), dtype=dtype, val_dtype=val_dtype, val_windows=windows),
        placement,
    )


def search_cache_key(options: SearchOptions, model: torch.nn.Module, layers: range) -> CacheKey:
    """The key of the cache a search of `options` builds on `model` (its shapes suffice; content digests are added
    by the caller that read them)."""
    pool = CandidatePool(options.pools, options.pool_size, options.seq_len, options.seed)
    return cache_key(
        options.model, model, pool, layers, activations=needs_activations(options), dtype=options.cache_dtype
    )


def memory_plan_of(options: SearchOptions) -> MemoryPlan:
    """The memory plan of a search, from the model's shapes alone (no weights read; see
    `adapruner.searching.memory_plan`); the model's depth and context are checked against --layers and --seq-len on the
    way."""
    shapes = load_shapes(options.model, DTYPES[options.dtype], options.trust_remote_code)
    check_context(shapes, options.seq_len)
    check_attention_pruning(shapes.config, options.spec.prune_attention, options.spec.inexact_heads)
    layers = parse_layer_range(options.spec.layers, len(decoder_layers(shapes)))
    moe = has_experts(shapes, layers)
    check_expert_metrics(options.metrics, options.spec.prune_mlp, moe, options.allocations, options.spec.sequential)
    key = search_cache_key(options, shapes, layers)
    model_bytes = sum(p.numel() * p.element_size() for p in shapes.parameters())
    refit_bytes = 0
    if options.refit_calib is not None:
        refit_bytes = refit_pool_bytes(shapes, layers, refit_fisher(options))
    widths = options.structure == "widths"  # its trials read no cache; they assemble layer variants
    return memory_plan(
        torch.device(options.device),
        model_bytes,
        0 if widths else planned_bytes(shapes, key),
        cache_folder(options),
        int(options.cache_mem_gb * GIB),
        options.device_map,
        refit_bytes,
        structure_bytes(shapes, layers) if widths else 0,
    )


def refit_fisher(options: SearchOptions) -> bool:
    """Whether the refit pool collects the output Fisher: pool trials weigh by it under `loss`; a widths search
    starts from the loss allocation's counts."""
    return any_output_fisher(options.allocations) and ("refit" in options.statistics or options.structure == "widths")


def check_search_out(out: Path) -> None:
    """A new directory, or one that holds an earlier search (resume); nothing else is written into."""
    earlier = (out / "search.json").is_file() or (out / STUDY_FILE).is_file()
    if out.exists() and any(out.iterdir()) and not earlier:
        raise AdaPrunerError(
            f"output {out} exists and holds no earlier search: pass a new --out (or the same --out to resume)"
        )
    check_writable(out / STUDY_FILE)


def study_dir(out: Path, study: str) -> Path:
    """Where a study's files go (best.json, trials.txt, plots, validation windows): `out` for the study that made
    it, `out/studies/<name>` for another study named with --study (one storage, separate files)."""
    if not (out / "search.json").is_file():
        return out
    return out if search_record(out, "pass a new --out")["study"] == study else out / "studies" / study


def saved_val_windows(path: Path, tokenizer, options: SearchOptions) -> None:
    """The trials' `val_windows` validation windows, written (atomically) to `path` for the workers; written anew on
    every run, so a damaged or stale file is never read. They are the first windows of wiki's validation articles,
    or of `--val-data`; where that file is also a candidate pool, the first of its windows the pool did not draw
    (validation never scores on calibration text)."""
    count, seq_len, source = options.val_windows, options.seq_len, options.val_data
    if source is None:
        windows, what = pool_windows(tokenizer, "wiki", seq_len, "val"), "the wiki validation split"
    else:
        windows, what = pool_windows(tokenizer, source, seq_len, "calib"), f"--val-data {source}"
        if source in options.pools:
            drawn = seeded_draw(tokenizer, source, options.pool_size, seq_len, options.seed, "")[0]
            free = torch.ones(windows.shape[0], dtype=torch.bool)
            free[drawn] = False
            windows, what = windows[free], f"--val-data {source}, less the {options.pool_size} windows --pools drew,"
    if windows.shape[0] < count:
        raise AdaPrunerError(
            f"{what} has {windows.shape[0]} windows of {seq_len} tokens: lower "
            f"{'--stages (its last entry)' if options.structure == 'widths' else '--val-windows'} to at most "
            f"{windows.shape[0]}{' (or --pool-size)' if source in options.pools else ''}"
        )
    with staged_file(path) as tmp:
        save_file({"windows": windows[:count].contiguous()}, str(tmp))


def run_search(
    options: SearchOptions, out: Path, progress: bool = True, before_writing: Callable[[], None] | None = None
) -> BestTrial:
    """Build or reuse the cache, run the study to `options.trials` finished trials, write the outputs.
    `before_writing` runs once the model has loaded, before anything is written (`run` marks its folder there)."""
    check_search_out(out)
    options.spec.check()
    if options.structure == "widths":
        check_width_options(options)
    if options.workers < 1 or options.trials < 1:
        raise AdaPrunerError("--workers and --trials must be at least 1")
    if options.startup_trials is not None and not 0 <= options.startup_trials <= options.trials:
        raise AdaPrunerError(f"--startup-trials {options.startup_trials} must lie in [0, --trials {options.trials}]")
    space = options.space
    if "refit" in space.statistics and options.refit_calib is None:
        raise AdaPrunerError("--statistics refit scores trials on the refit pool: pass --refit-calib (e.g. wiki:256)")
    pool_digests = [  # reads every pool, --refit-calib's and --val-data: bad files are refused before the model loads
        text_digest(pool) for pool in options.pools
    ]
    refit_pools = parse_calib_spec(options.refit_calib) if options.refit_calib else []
    refit_digests = [text_digest(pool) for pool, _n in refit_pools]
    val_digest = text_digest("wiki", "val") if options.val_data is None else text_digest(options.val_data)
    files = study_dir(out, options.study)
    options, placement = resolved(options)
    plan = memory_plan_of(options)
    plan.check(cache_exists=True)  # the disk is checked once the cache's file name (its content key) is known
    if progress:
        print(plan.table())
    setup = study_setup(options)
    storage_url = options.storage or f"sqlite:///{(out / STUDY_FILE).resolve()}"
    existing = options.storage is not None or (out / STUDY_FILE).is_file()  # checked before the model loads
    study = open_study(open_storage(storage_url), options.study, setup) if existing else None
    model, tokenizer = load_placed(options.model, placement)  # before a new OUT: a damaged model leaves nothing
    check_family_layout(model)
    if before_writing is not None:
        before_writing()
    if study is None:
        out.mkdir(parents=True, exist_ok=True)
        study = open_study(open_storage(storage_url), options.study, setup)
    files.mkdir(parents=True, exist_ok=True)
    layers = parse_layer_range(options.spec.layers, len(decoder_layers(model)))
    content = {"model": model_digest(model, tokenizer), "pools": pool_digests, "validation": val_digest}
    if refit_digests:
        content["refit"] = refit_digests
    pin_content(study, content)
    key = replace(
        search_cache_key(options, model, layers),
        model_digest=content["model"],
        pool_digests=tuple(content["pools"]),
    )
    cache_dir = cache_folder(options)
    widths = options.structure == "widths"  # trials read the refit pool alone: no activation cache
    plan.check(cache_exists=widths or (cache_dir / f"{key.digest()}.safetensors").is_file())
    cache = None
    if not widths:
        cache = load_or_build(
            model,
            tokenizer,
            key,
            cache_dir,
            int(options.cache_mem_gb * GIB) if plan.cache_on_device else 0,
            progress=progress,
            pin=plan.cache_place == "pinned",
        )
    if progress and cache is not None:
        where = (
            f"on {cache.device}"
            if cache.device.type != "cpu" or plan.cache_on_device
            else f"{'pinned' if cache.pinned else 'memory-mapped'} in host memory (see the memory plan)"
        )
        on = f"spread by --device-map {options.device_map}" if placement.dispatch else f"on {options.device}"
        print(f"model {options.model} in {options.dtype} {on}; activation cache {cache.nbytes / 2**30:.2f} GiB {where}")
    refit = refit_path = None
    if options.refit_calib is not None:
        refit_path = cache_dir / refit_key(
            content["model"], options.refit_calib, options.seq_len, options.seed, layers, refit_digests
        )
        windows = (options.refit_calib, options.seq_len, options.seed)
        host = plan.refit_place == "host"  # the memory plan's place: collected layer by layer into host memory
        refit = load_or_collect(model, tokenizer, windows, layers, refit_path, progress, refit_fisher(options), host)
        refit = refit.to("cpu" if host else options.device)
    val_path = files / "val.safetensors"
    saved_val_windows(val_path, tokenizer, options)
    write_json_atomic(
        files / "search.json",
        {
            "options": shown_options(asdict(options)),
            "storage": shown_url(options.storage) if options.storage else f"{STUDY_FILE} in {out}",
            "content": content,
            "cache": None if widths else str(cache_dir / f"{key.digest()}.safetensors"),
            "refit_pool": None if refit_path is None else str(refit_path),
        },
    )
    if widths:
        return run_width_search(options, model, refit, val_path, study, files, progress, plan.variants_bytes)
    paths = {"cache_path": str(cache_dir / f"{key.digest()}.safetensors"), "val_path": str(val_path)}
    paths["refit_path"] = None if refit_path is None else str(refit_path)
    base = WorkerSpec.of(options, layers, storage_url, paths)
    remaining = max(0, options.trials - finished(study))
    bar = tqdm(
        total=options.trials,
        initial=options.trials - remaining,
        desc=f"search ({options.sampler})",
        unit="trial",
        disable=not progress,
    )

    def show(study, _trial):
        bar.n = finished(study)
        best = _best_or_none(study)
        bar.set_postfix(best_val_ppl=f"{best.value:.2f}" if best else "-")
        bar.refresh()

    try:
        study = run_workers(
            base, options.workers, callbacks=[show], model=model, cache=cache, report=tqdm.write, refit=refit
        )
    finally:
        bar.close()
    return write_outputs(study, cache, space, files, options)


def backends(device: torch.device, cache_dtype: str) -> dict[str, str]:
    """Which implementation scored the trials (cached-gradient importance) and which gathers the kept units."""
    return {"importance": scoring_backend(device, cache_dtype), "gather": kernel_backend(device)}


def _best_or_none(study):
    try:
        return study.best_trial
    except ValueError:
        return None


def write_outputs(study, cache, space: SearchSpace, out: Path, options: SearchOptions) -> BestTrial:
    """best.json (configuration with sample addresses), a table of the best trials, history/importance PNGs."""
    best = _best_or_none(study)
    if best is None:
        raise AdaPrunerError(f"study {options.study!r} has no finished trial: see the failed trials' errors in {out}")
    config = config_of(best, cache, space)
    if not {"plan", "removed_fraction"} <= set(best.user_attrs):
        raise AdaPrunerError(
            f"study {options.study!r} was made by an older adapruner: its trials hold no plan; "
            "run the search with a new --out"
        )
    layers = cache.key.layers
    spec = trial_spec(options.spec.with_(layers=f"{layers[0]}:{layers[1]}"), config)
    summary = BestTrial(
        model=options.model,
        spec=spec.to_dict(),
        seq_len=options.seq_len,
        val_ppl=best.value,
        trial=best.number,
        sampler=options.sampler,
        seed=options.seed,
        samples=config.samples,
        blocks=config.blocks,
        addresses=[list(cache.addresses[i]) for i in config.samples],
        placement={
            "device": options.device,
            "dtype": options.dtype,
            "val_dtype": options.val_dtype,
            **({"device_map": options.device_map} if options.device_map else {}),
        },
        backends=backends(torch.device(options.device), cache.key.dtype),
        val_windows=options.val_windows,
        batch_size=options.batch_size,
        plan=PrunePlan.decode(best.user_attrs["plan"]).to_dict(),
        removed_fraction=best.user_attrs["removed_fraction"],
        refit_calib=options.refit_calib,
        statistics=config.statistics,
    )
    summary.write(out / "best.json")
    trials = sorted(study.get_trials(deepcopy=False, states=COUNTED), key=lambda t: (t.value is None, t.value or 0.0))
    rows = [
        [
            t.number,
            t.user_attrs.get("sampled_by", "-"),
            t.params.get("metric"),
            t.params.get("aggregation"),
            t.params.get("allocation", space.allocations[0]),
            t.params.get("compensation", space.compensations[0]),
            "refit" if _scored_on_pool(t.params, space) else len(t.user_attrs.get("samples", [])),
            t.user_attrs.get("removed_fraction", "-"),
            t.value if t.value is not None else "-",
        ]
        for t in trials[:10]
    ]
    table = format_table(
        ["trial", "sampled by", "metric", "agg", "allocation", "compensation", "samples", "removed", "val ppl"], rows
    )
    phases = [t.user_attrs.get("sampled_by") for t in sorted(trials, key=lambda t: t.number)]  # in the order they ran
    table += f"\n{len(trials)} finished trials: " + ", ".join(f"{phases.count(p)} {p}" for p in dict.fromkeys(phases))
    (out / "trials.txt").write_text(table + "\n")
    print(table)
    _plots(study, out)
    return summary


def _scored_on_pool(params: dict, space: SearchSpace) -> bool:
    """Whether a trial of these parameters scored its units on the refit pool (a parameter only where offered)."""
    return scored_by_moments(params["metric"]) and params.get("statistics", space.statistics[0]) == "refit"


def _plots(study, out: Path) -> None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna
    import optuna.visualization.matplotlib as vis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        vis.plot_optimization_history(study).figure.savefig(out / "history.png", dpi=110, bbox_inches="tight")
        try:
            vis.plot_param_importances(study).figure.savefig(out / "importances.png", dpi=110, bbox_inches="tight")
        except (ValueError, RuntimeError) as exc:  # too few or too uniform trials
            print(f"note: no parameter-importance plot ({exc})")
