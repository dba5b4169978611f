"""`adapruner search --structure widths`: the per-layer widths evolution (`adapruner.searching.width_study`) on the
refit pool, in the search's Optuna study → best.json (the structure's plan), trials.txt, history.png, widths.png."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from safetensors.torch import load_file

from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.spec import PruneSpec
from adapruner.errors import AdaPrunerError
from adapruner.kernels.dispatch import kernel_backend
from adapruner.model.structure import decoder_layers, parse_layer_range
from adapruner.output.report import format_table
from adapruner.recipes import DEFAULT_RECIPE, recipe
from adapruner.scoring.metrics import metric as registered
from adapruner.scoring.refit_pool import RefitPool
from adapruner.searching.best_trial import BestTrial
from adapruner.searching.front import write_front
from adapruner.searching.search_options import SearchOptions
from adapruner.searching.width_study import WidthStudy, best_structure, trials_at, units_of


def width_spec(options: SearchOptions) -> PruneSpec:
    """The one configuration a widths search ranks, starts and refits with: of each choice the space offers, the
    default recipe's fixed one (`prune`'s: fluct, sum, the loss allocation, lsq) where offered, else the first."""
    fixed = recipe(DEFAULT_RECIPE).prune
    preferred = {
        "metrics": fixed["metric"],
        "aggregations": fixed["aggregation"],
        "allocations": fixed["allocation"],
        "compensations": fixed["compensation"],
    }
    chosen = {
        name: value if value in getattr(options, name) else getattr(options, name)[0]
        for name, value in preferred.items()
    }
    return options.spec.with_(
        metric=chosen["metrics"],
        aggregation=chosen["aggregations"],
        allocation=chosen["allocations"],
        compensation=chosen["compensations"],
    )


def check_width_options(options: SearchOptions) -> None:
    """What a widths search needs, checked before the model loads (one-line errors naming the fix)."""
    if options.spec.target_params is None:
        raise AdaPrunerError("--structure widths spreads a parameter budget over the layers: pass --target-params")
    if options.refit_calib is None:
        raise AdaPrunerError("--structure widths ranks and refits units on the refit pool: pass --refit-calib wiki:256")
    if options.workers != 1:
        raise AdaPrunerError("--structure widths runs its generations one after another: pass --workers 1")
    if options.spec.sequential or options.early_stop:
        raise AdaPrunerError(
            "--structure widths scores every structure from the dense layers' statistics, and its stages stop bad "
            "ones early: drop --sequential and --early-stop"
        )
    metric = width_spec(options).metric
    if registered(metric).surgeon:
        best = recipe(DEFAULT_RECIPE).prune["metric"]
        raise AdaPrunerError(
            f"--structure widths ranks units once; {metric} orders them anew per count: offer --metrics {best}"
        )


def run_width_search(
    options: SearchOptions,
    model: torch.nn.Module,
    refit: RefitPool,
    val_path: Path,
    study: optuna.Study,
    out: Path,
    progress: bool = True,
    variants_bytes: int | None = None,
) -> BestTrial:
    """Run (or resume) the evolution in `study` and write best.json (the structure at --target-params), trials.txt
    and the plots into `out`; a front (--front) adds front.json (the best structure at each budget) and front.png.
    The layer variants are held in at most `variants_bytes` (the memory plan's bound; None: no bound)."""
    layers = parse_layer_range(options.spec.layers, len(decoder_layers(model)))
    spec = width_spec(options).with_(layers=f"{layers.start}:{layers.stop}")
    search = options.width_search()
    val = load_file(str(val_path))["windows"]
    searched = WidthStudy(model, spec, refit, val, search, options.val_dtype, options.batch_size, variants_bytes)
    searched.run(study, progress)
    points = {budget: found_at(options, searched, study, budget) for budget in searched.budgets}
    summary = points[spec.target_params]
    summary.write(out / "best.json")
    table = trials_table(study, searched, options.objective)
    front = front_points(study, searched, points) if search.front else []
    if front:
        table += "\n\n" + front_table(front, options.objective)
        write_front(out / "front.json", list(points.values()))
    (out / "trials.txt").write_text(table + "\n")
    if progress:
        print(table)
    _plots(study, searched, units_of(best_structure(study, spec.target_params).params, searched.space), out)
    if front:
        _front_plot(front, options.objective, out / "front.png")
    return summary


def found_at(options: SearchOptions, searched: WidthStudy, study: optuna.Study, budget: float) -> BestTrial:
    """The best structure the evolution at `budget` found, as a best.json record (its perplexity measured on all
    the search's windows)."""
    best = best_structure(study, budget)
    return BestTrial(
        model=options.model,
        spec=searched.spec.with_(target_params=budget).to_dict(),
        seq_len=options.seq_len,
        val_ppl=searched.validation_perplexity(units_of(best.params, searched.space)),
        trial=best.number,
        sampler="evolution",
        seed=options.seed,
        samples=[],
        blocks=[],
        addresses=[],
        placement={"device": options.device, "dtype": options.dtype, "val_dtype": options.val_dtype},
        backends={"importance": "refit pool moments", "gather": kernel_backend(torch.device(options.device))},
        val_windows=options.val_windows,
        batch_size=options.batch_size,
        plan=PrunePlan.decode(best.user_attrs["plan"]).to_dict(),
        removed_fraction=best.user_attrs["removed_fraction"],
        refit_calib=options.refit_calib,
        statistics="refit",
        structure="widths",
        val_kl=best.value if options.objective == "kl" else None,
    )


def trials_table(study: optuna.Study, searched: WidthStudy, objective: str) -> str:
    """The ten best structures at the delivered budget scored on every stage, then how many were dropped at each
    stage."""
    budget = searched.spec.target_params
    complete = sorted(trials_at(study, budget, (optuna.trial.TrialState.COMPLETE,)), key=lambda t: (t.value, t.number))
    space, value = searched.space, "val KL" if objective == "kl" else "val log ppl"
    rows = []
    for trial in complete[:10]:
        units = units_of(trial.params, space)
        gone = {kind: sum(units[m] == space.units[m] for m in space.units if m[1] == kind) for kind in ("attn", "mlp")}
        counts = space.layer_counts(units)
        rows.append(
            [
                trial.number,
                trial.user_attrs["generation"],
                sum(c[0] for c in counts.values()),
                sum(c[1] for c in counts.values()),
                f"{gone['attn']}/{gone['mlp']}",
                f"{trial.user_attrs['removed_fraction']:.4f}",
                f"{trial.value:.5g}",
            ]
        )
    headers = ["trial", "generation", "attn units", "mlp channels", "blocks gone (attn/mlp)", "removed", value]
    trials = trials_at(study, budget)
    dropped = {}
    for trial in trials:
        if trial.state == optuna.trial.TrialState.PRUNED:
            at = max(trial.intermediate_values)
            dropped[at] = dropped.get(at, 0) + 1
    start = next(t for t in sorted(trials, key=lambda t: t.number) if t.user_attrs["generation"] == 0)
    stages = ", ".join(f"{n} after {w} windows" for w, n in sorted(dropped.items()))
    at = f" at {budget:g} removed" if len(searched.budgets) > 1 else ""
    return (
        format_table(headers, rows)
        + f"\n{len(trials)} trials{at}, {len({tuple(sorted(t.params.items())) for t in trials})} structures: "
        + f"{len(complete)} scored on all {searched.search.stages.windows[-1]} windows"
        + (f", dropped {stages}" if stages else "")
        + f"; the loss allocation (trial {start.number}) scored {start.value:.5g}, the best {complete[0].value:.5g}"
    )


@dataclass(frozen=True)
class FrontPoint:
    """One budget of a front: the loss allocation's and the searched structure's objective and perplexity."""

    budget: float
    removed: float  # the searched structure's removed fraction of all parameters
    trials: int
    start_value: float
    best_value: float
    start_ppl: float
    best_ppl: float


def front_points(study: optuna.Study, searched: WidthStudy, points: dict[float, BestTrial]) -> list[FrontPoint]:
    """Per budget, the loss allocation (the evolution's generation 0) against the best structure found."""
    rows = []
    for budget, best in points.items():
        start = next(t for t in trials_at(study, budget) if t.user_attrs["generation"] == 0)
        start_units = searched.space_at(budget).module_counts(searched.start_at(budget))
        rows.append(
            FrontPoint(
                budget,
                best.removed_fraction,
                len(trials_at(study, budget)),
                start.value,
                best_structure(study, budget).value,
                searched.validation_perplexity(start_units),
                best.val_ppl,
            )
        )
    return rows


def front_table(points: list[FrontPoint], objective: str) -> str:
    value = "KL" if objective == "kl" else "log ppl"
    rows = [
        [
            f"{p.budget:g}",
            f"{p.removed:.4f}",
            p.trials,
            f"{p.start_value:.5g}",
            f"{p.best_value:.5g}",
            f"{p.start_ppl:.4g}",
            f"{p.best_ppl:.4g}",
            f"{100 * (p.best_ppl / p.start_ppl - 1):+.1f}%",
        ]
        for p in points
    ]
    headers = ["budget", "removed", "trials", f"loss alloc {value}", f"searched {value}", "loss alloc ppl"]
    return "the front (on the search's validation windows)\n" + format_table(
        [*headers, "searched ppl", "ppl change"], rows
    )


def _front_plot(points: list[FrontPoint], objective: str, path: Path) -> None:
    """front.png: objective and perplexity against the removed fraction, loss allocation vs searched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    removed = [p.removed for p in points]
    value = "mean KL from the dense model" if objective == "kl" else "log perplexity"
    for axis, (start, best, label) in zip(
        axes,
        (
            ([p.start_value for p in points], [p.best_value for p in points], value),
            ([p.start_ppl for p in points], [p.best_ppl for p in points], "perplexity"),
        ),
    ):
        axis.plot(removed, start, "o--", label="loss allocation")
        axis.plot(removed, best, "o-", label="searched widths")
        axis.set(xlabel="share of parameters removed", ylabel=label)
    axes[1].set_yscale("log")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plots(study: optuna.Study, searched: WidthStudy, best, out: Path) -> None:
    """history.png (the best value per structure scored) and widths.png (units removed per layer: the loss
    allocation's and the best structure's)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        vis.plot_optimization_history(study).figure.savefig(out / "history.png", dpi=110, bbox_inches="tight")
    space = searched.space
    start = space.module_counts(searched.start)
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for axis, kind, what in zip(axes, ("attn", "mlp"), ("attention units", "MLP blocks")):
        modules = sorted(m for m in space.units if m[1] == kind)
        layers = [m[0] for m in modules]
        axis.bar([i - 0.2 for i in layers], [start[m] / space.units[m] for m in modules], 0.4, label="loss allocation")
        axis.bar([i + 0.2 for i in layers], [best[m] / space.units[m] for m in modules], 0.4, label="searched")
        axis.set(xlabel="layer", ylabel=f"share of {what} removed", ylim=(0, 1))
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out / "widths.png", dpi=110)
    plt.close(figure)
