"""AdaPruner's search: Optuna TPE over calibration subsets and importance metrics, scored on cached tensors.

A trial chooses (1) the metric, (2) for a metric of input moments (act, fluct, obs) where the search has a refit
pool, whether it is scored on the whole refit pool or on a sample subset, (3) for a subset, which samples — the
candidate pool of each text pool is cut into `blocks_per_pool` blocks, each included or not, and the first
`n_samples` of the included blocks are taken round-robin — (4) the aggregation and, where offered, the allocation
(with a depth slope of the per-layer ratio: same mean ratio) and the compensation. A compensated trial refits from
the refit pool where the search has one (`adapruner.scoring.refit_pool`), else from its subset. Its value is the
validation perplexity of the model pruned that way (validation articles are disjoint from evaluation ones).

Why blocks: TPE models each parameter's good and bad densities; 12 binary block switches plus a count give it
a space it can learn from in tens of trials (which pools and which groups of windows help), whereas one switch
per sample (hundreds) would stay random for any realistic budget.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field

import torch
from torch import nn

from adapruner.choosing.allocation import count_params
from adapruner.choosing.allocation_rules import DEFAULT_ALLOCATION
from adapruner.choosing.allocation_rules import allocation as allocation_rule
from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.selection import plan_allocation
from adapruner.choosing.spec import (
    AGGREGATIONS,
    PruneSpec,
    check_aggregation,
    check_allocation,
    check_compensation,
)
from adapruner.cutting.compensation import refit_updates
from adapruner.cutting.removal import plan_removed
from adapruner.errors import AdaPrunerError
from adapruner.scoring.cache import ActivationCache
from adapruner.scoring.metrics import SEARCHED_METRICS
from adapruner.scoring.metrics import metric as registered
from adapruner.scoring.refit_pool import RefitPool, scored_by_moments
from adapruner.scoring.sources import CacheSubset, StatisticsSource
from adapruner.searching.trial_scorer import ValidationScorer

DEFAULT_SAMPLE_COUNTS = (4, 8, 16, 32)
STATISTICS = ("subset", "refit")  # where a moment metric's statistics come from: a sample subset, or the refit pool
WORKER_ATTR = "worker"  # user attribute of a trial: which process runs it (host:pid)


def worker_name(pid: int | None = None) -> str:
    """`host:pid` of this process (or of `pid` on this host): the `WORKER_ATTR` every trial carries."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


@dataclass
class SearchSpace:
    """What a trial may choose."""

    metrics: tuple[str, ...] = SEARCHED_METRICS
    aggregations: tuple[str, ...] = AGGREGATIONS
    sample_counts: tuple[int, ...] = DEFAULT_SAMPLE_COUNTS
    blocks_per_pool: int = 4
    depth_slope: float = 0.5  # trials of the `depth` allocation draw a slope in [-depth_slope, depth_slope]
    allocations: tuple[str, ...] = (DEFAULT_ALLOCATION,)
    compensations: tuple[str, ...] = ("none",)
    statistics: tuple[str, ...] = ("subset",)  # of moment metrics ("refit" needs the refit pool); others: subsets

    def __post_init__(self):
        for metric in self.metrics:
            registered(metric)
        for aggregation in self.aggregations:
            check_aggregation(aggregation)
        for allocation in self.allocations:
            check_allocation(allocation)
        for compensation in self.compensations:
            check_compensation(compensation)
        if not 0.0 <= self.depth_slope < 1.0:
            raise AdaPrunerError(f"--depth-slope {self.depth_slope} is outside [0, 1)")
        if not self.statistics or not set(self.statistics) <= set(STATISTICS):
            raise AdaPrunerError(f"--statistics {','.join(self.statistics)}: use subset, refit or both")


@dataclass
class TrialConfig:
    """One point of the space: the sample subset (indices into the cache's pool; none where the refit pool scores),
    metric, aggregation, allocation (with its depth slope), compensation, and where the statistics come from."""

    samples: list[int]
    metric: str
    aggregation: str
    slope: float = 0.0
    blocks: list[str] = field(default_factory=list)
    allocation: str = DEFAULT_ALLOCATION
    compensation: str = "none"
    statistics: str = "subset"


def pool_blocks(cache: ActivationCache, blocks_per_pool: int) -> dict[str, list[int]]:
    """Block name → sample indices: each pool's cached samples cut into `blocks_per_pool` contiguous blocks."""
    blocks = {}
    pools = list(dict.fromkeys(p for p, _ in cache.addresses))
    for pool, short in zip(pools, short_names(pools)):
        members = cache.samples_of_pool(pool)
        size = math.ceil(len(members) / blocks_per_pool)
        for b in range(blocks_per_pool):
            if members[b * size : (b + 1) * size]:
                blocks[f"{short}{b}"] = members[b * size : (b + 1) * size]
    return blocks


def short_names(pools: list[str]) -> list[str]:
    """A distinct parameter-name prefix per pool: its file name's letters and digits (`wiki_`, `notestxt_`); pools
    whose file names agree (a/notes.txt, b/notes.txt) are told apart by their position (`notestxt1_`, `notestxt2_`)."""
    shorts = ["".join(ch for ch in pool.rsplit("/", 1)[-1] if ch.isalnum())[:12] for pool in pools]
    return [f"{short}{k}_" if shorts.count(short) > 1 else f"{short}_" for k, short in enumerate(shorts, start=1)]


def round_robin(blocks: list[list[int]], n: int) -> list[int]:
    """The first n samples taking one from each block in turn (sorted on return)."""
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n and any(depth < len(b) for b in blocks):
        chosen += [b[depth] for b in blocks if depth < len(b)][: n - len(chosen)]
        depth += 1
    return sorted(chosen)


def suggest(trial, space: SearchSpace, blocks: dict[str, list[int]]) -> TrialConfig:
    """Draw a `TrialConfig` from an Optuna trial (parameters: metric, statistics (moment metrics, where the space
    offers both), block_* and n_samples (subset trials), aggregation (metrics of several members), and where the
    space offers a choice:
    allocation, slope (depth trials), compensation)."""
    metric = trial.suggest_categorical("metric", list(space.metrics))
    statistics = _choice(trial, "statistics", space.statistics) if scored_by_moments(metric) else "subset"
    if statistics == "refit":
        samples, chosen_blocks = [], []
    else:
        included = [name for name in blocks if trial.suggest_categorical(f"block_{name}", [True, False])]
        n = trial.suggest_categorical("n_samples", list(space.sample_counts))
        chosen_blocks = included or list(blocks)  # no block switched on: use them all
        samples = round_robin([blocks[b] for b in chosen_blocks], n)
    aggregation = (  # a metric of the output projections' columns alone scores one member: nothing to aggregate
        space.aggregations[0]
        if registered(metric).columns_only
        else trial.suggest_categorical("aggregation", list(space.aggregations))
    )
    allocation = _choice(trial, "allocation", space.allocations)
    slope = (
        trial.suggest_float("slope", -space.depth_slope, space.depth_slope)
        if allocation_rule(allocation).sloped and space.depth_slope > 0
        else 0.0
    )
    compensation = _choice(trial, "compensation", space.compensations)
    return TrialConfig(samples, metric, aggregation, slope, chosen_blocks, allocation, compensation, statistics)


def _choice(trial, name: str, options: tuple[str, ...]) -> str:
    """A categorical parameter where there is a choice; the one option otherwise (no parameter in the study)."""
    return trial.suggest_categorical(name, list(options)) if len(options) > 1 else options[0]


def trial_spec(study: PruneSpec, config: TrialConfig) -> PruneSpec:
    """The whole spec of one trial: the study's fixed part with the trial's choices."""
    return study.with_(
        metric=config.metric,
        aggregation=config.aggregation,
        allocation=config.allocation,
        depth_slope=config.slope,
        compensation=config.compensation,
    )


def trial_statistics(
    cache: ActivationCache, config: TrialConfig, refit: RefitPool | None = None
) -> tuple[StatisticsSource, StatisticsSource]:
    """Where a trial's scores and its refit's moments come from: the cache rows of its samples, or the refit pool
    (scores where the trial chose `refit` statistics; the refit wherever the search has one)."""
    subset = CacheSubset(cache, torch.tensor(config.samples, dtype=torch.long))
    if config.statistics == "refit" and refit is None:
        raise AdaPrunerError("a trial scored on the refit pool needs the search's refit pool (--refit-calib)")
    return (refit if config.statistics == "refit" else subset), (subset if refit is None else refit)


def trial_plan(
    model: nn.Module,
    cache: ActivationCache,
    study: PruneSpec,
    config: TrialConfig,
    seed: int = 0,
    refit: RefitPool | None = None,
) -> PrunePlan:
    """What one trial configuration keeps of `model` (the study's spec with the trial's choices), scored from the
    cache rows of its samples, or from the refit pool's moments (the model is only read)."""
    spec = trial_spec(study, config)
    scores, _refit = trial_statistics(cache, config, refit)
    return plan_allocation(model, scores.importance(model, spec, seed), spec)


def trial_updates(
    model: nn.Module,
    cache: ActivationCache,
    study: PruneSpec,
    config: TrialConfig,
    plan: PrunePlan,
    refit: RefitPool | None = None,
) -> dict:
    """The compensated output linears of a trial's plan, from the refit pool's moments where the search has one,
    else from the moments of its samples' cached inputs."""
    spec = trial_spec(study, config)
    _scores, moments = trial_statistics(cache, config, refit)
    return refit_updates(model, plan, moments, spec.compensation, spec.damp)


class Objective:
    """Optuna objective: suggest → plan from the cache → validation perplexity of the pruned model (lower is better)."""

    def __init__(
        self,
        model: nn.Module,
        cache: ActivationCache,
        spec: PruneSpec,
        space: SearchSpace,
        scorer: ValidationScorer,
        early_stop: bool = False,
        startup_trials: int = 0,
        refit: RefitPool | None = None,
    ):
        self.model, self.cache, self.spec, self.space = model, cache, spec, space
        self.scorer, self.early_stop, self.startup_trials = scorer, early_stop, startup_trials
        self.refit = refit
        if "refit" in space.statistics and refit is None:
            raise AdaPrunerError("--statistics refit scores trials on the refit pool: pass --refit-calib")
        self.blocks = pool_blocks(cache, space.blocks_per_pool)

    def __call__(self, trial) -> float:
        import optuna

        trial.set_user_attr(WORKER_ATTR, worker_name())  # a parent that sees this process die retries the trial
        complete = optuna.trial.TrialState.COMPLETE
        finished = trial.study.get_trials(deepcopy=False, states=(complete, optuna.trial.TrialState.PRUNED))
        sampler = trial.study.sampler
        if isinstance(sampler, optuna.samplers.TPESampler):
            trial.set_user_attr("sampled_by", "start-up (random)" if len(finished) < self.startup_trials else "tpe")
        else:
            trial.set_user_attr("sampled_by", type(sampler).__name__.removesuffix("Sampler").lower())
        config = suggest(trial, self.space, self.blocks)
        earlier = next((t for t in finished if t.state == complete and t.params == trial.params), None)
        if earlier is not None:  # a parameter set the study already ran: its result, not a second run
            trial.set_user_attr("repeat_of", earlier.number)
            for name in ("samples", "addresses", "plan", "removed_fraction"):
                trial.set_user_attr(name, earlier.user_attrs[name])
            return earlier.value
        trial.set_user_attr("samples", config.samples)
        trial.set_user_attr("addresses", [list(self.cache.addresses[i]) for i in config.samples])
        plan = trial_plan(self.model, self.cache, self.spec, config, refit=self.refit)
        trial.set_user_attr("plan", plan.encode())  # what this trial scored is what `prune --from-study` delivers
        trial.set_user_attr("removed_fraction", plan_removed(self.model, plan) / count_params(self.model))
        updates = trial_updates(self.model, self.cache, self.spec, config, plan, self.refit)

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if self.early_stop and trial.should_prune():
                raise optuna.TrialPruned()

        return self.scorer.score(plan, report, updates)


def config_of(trial, cache: ActivationCache, space: SearchSpace) -> TrialConfig:
    """Rebuild a finished trial's configuration from its parameters."""
    import optuna

    fixed = optuna.trial.FixedTrial(trial.params)
    return suggest(fixed, space, pool_blocks(cache, space.blocks_per_pool))
