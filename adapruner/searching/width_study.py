"""The structure search as an Optuna study (`search --structure widths`, issue 33): the (1+λ) width evolution of
`adapruner.searching.evolution` from the `loss` allocation's counts, units ranked and refit from the refit pool
(`adapruner.searching.widths`), scored on the validation windows from the cached prefix.

Every structure the evolution scores is a trial: its parameters are the units removed per module (`u_<layer>_<attn|
mlp>`), its intermediate values its scores on each stage's windows (step = the stage's cumulative windows), its user
attributes the chunk scores, the generation and the plan. It is COMPLETE where it was scored on every stage, PRUNED
where selection dropped it earlier. The best COMPLETE trial is the evolution's parent (a child replaces the parent only
by scoring lower on all the windows), so `best.json` and `prune --from-study` deliver the structure the search
ended on; a study resumed from its storage replays the evolution from the recorded chunk scores without scoring them
again.
"""

from __future__ import annotations

import math
from functools import cached_property

import optuna
from torch import nn

from adapruner.choosing.allocation import count_params
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import allocate
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.removal import plan_removed
from adapruner.errors import AdaPrunerError
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


def recorded_scores(study: optuna.Study, space: WidthSpace) -> dict[Key, list[float]]:
    """The chunk scores the study's trials hold, per structure (the longest record of each)."""
    memo: dict[Key, list[float]] = {}
    for trial in study.get_trials(deepcopy=False, states=COUNTED):
        key = key_of(units_of(trial.params, space))
        chunks = trial.user_attrs["chunks"]
        if len(chunks) > len(memo.get(key, [])):
            memo[key] = chunks
    return memo


def best_structure(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The COMPLETE trial of least value (the earliest of equals): the evolution's parent."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise AdaPrunerError(f"study {study.study_name!r} has no structure scored on every stage: run it again")
    return min(complete, key=lambda t: (t.value, t.number))


class WidthStudy:
    """The space, variants, starting counts and stage scorers of one structure search of `model` under `spec` (fluct
    or another metric that ranks units once; its allocation gives the start), on `val_windows` from layer `start`."""

    def __init__(
        self,
        model: nn.Module,
        spec: PruneSpec,
        statistics: StatisticsSource,
        val_windows,
        search: WidthSearch,
        start: int = 0,
        val_dtype: str = "float32",
        batch_size: int = 8,
    ):
        if val_windows.shape[0] < search.stages.windows[-1]:
            raise AdaPrunerError(
                f"--stages ends at {search.stages.windows[-1]} windows; the validation text has {val_windows.shape[0]}"
            )
        self.model, self.spec, self.search = model, spec, search
        self.space = WidthSpace.of(model, spec)
        self.variants = LayerVariants(model, spec, statistics, search.seed)
        self.start = allocate(model, self.variants.importance, spec)[0]
        self.scorers = [
            ValidationScorer(model, val_windows[a:b], start, val_dtype, batch_size) for a, b in search.stages.chunks
        ]
        self._whole_args = (val_windows[: search.stages.windows[-1]], start, val_dtype, batch_size)

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

    def run(self, study: optuna.Study, progress: bool = True) -> Evolution:
        """Run (or resume) the evolution in `study`, one trial per structure scored (module docstring)."""
        stages = self.search.stages
        sizes = [b - a for a, b in stages.chunks]
        distributions = {
            param_name(m): optuna.distributions.IntDistribution(0, n - self.space.floors[m])
            for m, n in self.space.units.items()
        }
        total = count_params(self.model)

        def record(generation: int, structures: list[tuple[Units, list[float]]]) -> None:
            for units, chunks in structures:
                plan = self.variants.plan(self.space.layer_counts(units))
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
                            "chunks": chunks,
                            "sampled_by": "evolution",
                            "plan": plan.encode(),
                            "removed_fraction": plan_removed(self.model, plan) / total,
                        },
                    )
                )

        return evolve(
            self.space,
            self.start,
            self.score,
            stages,
            Schedule(self.search.generations, self.search.children, self.search.seed),
            progress,
            memo=recorded_scores(study, self.space),
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
