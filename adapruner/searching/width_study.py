"""The structure search as an Optuna study (`search --structure widths`, issue 33): the (1+λ) width evolution of
`adapruner.searching.evolution` from the `loss` allocation's counts, units ranked and refit from the refit pool
(`adapruner.searching.widths`), scored on the validation windows from the cached prefix.

Every structure the evolution scores is a trial: its parameters are the units removed per module (`u_<layer>_<attn|
mlp>`), its intermediate values its scores on each stage's windows (step = the stage's cumulative windows), its user
attributes the chunk scores, the generation and the plan. It is COMPLETE where it was scored on every stage, PRUNED
where selection dropped it earlier. The best COMPLETE trial is the evolution's parent (a child replaces the parent only
by scoring lower on all the windows), so `best.json` and `prune --from-study` deliver the structure the search
ended on; a study resumed from its storage replays the evolution from the recorded chunk scores without scoring them
again. A front (`WidthSearch.front`) runs one such evolution per budget, in ascending order, each from its budget's
loss allocation with the same seed (so each equals a search of that budget alone); a trial's `budget` attribute says
which it belongs to (trials of studies made before fronts hold none: they are of the set-up's one budget).
"""

from __future__ import annotations

import math
from functools import cached_property

import optuna
from torch import nn

from adapruner.choosing.allocation import Counts, count_params
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import allocate
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.removal import plan_removed
from adapruner.errors import AdaPrunerError
from adapruner.model.structure import decoder_layers, parse_layer_range
from adapruner.scoring.sources import StatisticsSource
from adapruner.searching.evolution import Evolution, Key, Schedule, Units, evolve, key_of
from adapruner.searching.search_options import WidthSearch
from adapruner.searching.study import COUNTED
from adapruner.searching.trial_scorer import ValidationScorer
from adapruner.searching.widths import LayerVariants, Module, WidthSpace


def param_name(module: Module) -> str:
    return f"u_{module[0]}_{module[1]}"


def units_of(params: dict, space: WidthSpace) -> Units:
    """A trial's units removed per module."""
    return {m: params[param_name(m)] for m in space.units}


def trials_at(study: optuna.Study, budget: float | None, states=COUNTED) -> list[optuna.trial.FrozenTrial]:
    """The study's trials in `states` of the evolution at `budget` (None: of every budget); a trial with no `budget`
    attribute (made before fronts) is of the study's one budget."""
    trials = study.get_trials(deepcopy=False, states=states)
    return [t for t in trials if budget is None or t.user_attrs.get("budget", budget) == budget]


def recorded_scores(study: optuna.Study, space: WidthSpace, budget: float | None = None) -> dict[Key, list[float]]:
    """The chunk scores the study's trials (at `budget`) hold, per structure (the longest record of each)."""
    memo: dict[Key, list[float]] = {}
    for trial in trials_at(study, budget):
        key = key_of(units_of(trial.params, space))
        chunks = trial.user_attrs["chunks"]
        if len(chunks) > len(memo.get(key, [])):
            memo[key] = chunks
    return memo


def best_structure(study: optuna.Study, budget: float | None = None) -> optuna.trial.FrozenTrial:
    """The COMPLETE trial (at `budget`) of least value (the earliest of equals): the evolution's parent."""
    complete = trials_at(study, budget, (optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise AdaPrunerError(f"study {study.study_name!r} has no structure scored on every stage: run it again")
    return min(complete, key=lambda t: (t.value, t.number))


class WidthStudy:
    """The variants and stage scorers of one structure search of `model` under `spec` (fluct or another metric that
    ranks units once; its allocation gives each budget's start), on `val_windows` from its first pruned layer; `space`
    and `start` are those of `spec`'s budget (the one best.json delivers), `space_at`/`start_at` any budget's; the
    layer variants are held in at most `variants_bytes` (None: no bound)."""

    def __init__(
        self,
        model: nn.Module,
        spec: PruneSpec,
        statistics: StatisticsSource,
        val_windows,
        search: WidthSearch,
        val_dtype: str = "float32",
        batch_size: int = 8,
        variants_bytes: int | None = None,
    ):
        if val_windows.shape[0] < search.stages.windows[-1]:
            raise AdaPrunerError(
                f"--stages ends at {search.stages.windows[-1]} windows; the validation text has {val_windows.shape[0]}"
            )
        self.model, self.spec, self.search = model, spec, search
        self.budgets = search.front or (spec.target_params,)
        if spec.target_params not in self.budgets:
            raise AdaPrunerError(f"the delivered budget {spec.target_params} is not one of the front's {self.budgets}")
        self._spaces: dict[float, WidthSpace] = {}
        self._starts: dict[float, Counts] = {}
        self.space = self.space_at(spec.target_params)
        self.variants = LayerVariants(model, spec, statistics, search.seed, variants_bytes)
        self.start = self.start_at(spec.target_params)
        first = parse_layer_range(spec.layers, len(decoder_layers(model))).start  # layers before it: a cached prefix
        self.scorers = [
            ValidationScorer(model, val_windows[a:b], first, val_dtype, batch_size) for a, b in search.stages.chunks
        ]
        self._whole_args = (val_windows[: search.stages.windows[-1]], first, val_dtype, batch_size)

    def space_at(self, budget: float) -> WidthSpace:
        if budget not in self._spaces:
            self._spaces[budget] = WidthSpace.of(self.model, self.spec.with_(target_params=budget))
        return self._spaces[budget]

    def start_at(self, budget: float) -> Counts:
        """The loss allocation's counts at `budget` (from the variants' ranking)."""
        if budget not in self._starts:
            spec = self.spec.with_(target_params=budget)
            self._starts[budget] = allocate(self.model, self.variants.importance, spec)[0]
        return self._starts[budget]

    def plan_and_updates(self, units: Units) -> tuple[PrunePlan, dict]:
        counts = self.space.layer_counts(units)
        return self.variants.plan(counts), self.variants.updates(counts)

    def score(self, counts, chunk: int) -> float:
        """The objective on stage chunk `chunk`: mean KL, or log perplexity (both averaged over windows); a
        non-finite one (an overflow in a low-precision validation dtype) is +inf, the worst."""
        plan, updates = self.variants.plan(counts), self.variants.updates(counts)
        scorer = self.scorers[chunk]
        value = (
            scorer.kl(plan, updates) if self.search.objective == "kl" else math.log(scorer.score(plan, None, updates))
        )
        return value if math.isfinite(value) else math.inf

    def run(self, study: optuna.Study, progress: bool = True) -> dict[float, Evolution]:
        """Run (or resume) the evolution of every budget in `study`, one trial per structure scored (module
        docstring)."""
        return {budget: self.run_budget(study, budget, progress) for budget in self.budgets}

    def run_budget(self, study: optuna.Study, budget: float, progress: bool = True) -> Evolution:
        """Run (or resume) the evolution at `budget` in `study`."""
        stages, space = self.search.stages, self.space_at(budget)
        sizes = [b - a for a, b in stages.chunks]
        distributions = {
            param_name(m): optuna.distributions.IntDistribution(0, n - space.floors[m]) for m, n in space.units.items()
        }
        total = count_params(self.model)

        def record(generation: int, structures: list[tuple[Units, list[float]]]) -> None:
            for units, chunks in structures:
                plan = self.variants.plan(space.layer_counts(units))
                steps = {
                    stages.windows[k]: sum(c * n for c, n in zip(chunks[: k + 1], sizes)) / stages.windows[k]
                    for k in range(len(chunks))
                }
                complete = len(chunks) == len(stages.windows)
                study.add_trial(
                    optuna.trial.create_trial(
                        state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.PRUNED,
                        value=steps[stages.windows[len(chunks) - 1]],
                        params={param_name(m): u for m, u in units.items()},
                        distributions=distributions,
                        intermediate_values=steps,
                        user_attrs={
                            "generation": generation,
                            "budget": budget,
                            "chunks": chunks,
                            "sampled_by": "evolution",
                            "plan": plan.encode(),
                            "removed_fraction": plan_removed(self.model, plan) / total,
                        },
                    )
                )

        return evolve(
            space,
            self.start_at(budget),
            self.score,
            stages,
            Schedule(self.search.generations, self.search.children, self.search.seed),
            (f"generations at {budget:g}" if len(self.budgets) > 1 else "generations") if progress else None,
            memo=recorded_scores(study, space, budget),
            record=record,
        )

    @cached_property
    def whole(self) -> ValidationScorer:
        """The scorer of all the stages' windows (its prefix computed on first use: only the delivered structure's
        perplexity reads it)."""
        return ValidationScorer(self.model, *self._whole_args)

    def validation_perplexity(self, units: Units) -> float:
        """Perplexity of a structure on all the stages' windows."""
        plan, updates = self.plan_and_updates(units)
        return self.whole.score(plan, None, updates)
