"""A (1+λ) evolutionary search over per-layer widths under the parameter budget, with multi-step selection — the
scheme of EvoPress (Sieberling et al., 2024) on our width space (issue 33).

Genome: units removed per module, u_m ∈ [0, n_m − floor_m] (`WidthSpace`). Mutation: `swaps` times, one module
takes one step more and another gives one step back, a step being one attention unit, or in an MLP the blocks worth
one attention unit of its layer (`step_params`; an MLP-only space uses n_m / 8 blocks); the child is then repaired to
the budget with single MLP blocks (added to or taken from random MLPs until T ≤ removed < T + one block), so every
child meets the budget as the counts of `WidthSpace.counts` do.
Selection: each generation draws λ children of the parent; all are scored on the first stage's windows, the best
`survivors[0]` go on to the next stage's (cumulative) windows, and so on; the last survivor replaces the parent if it
scores lower than the parent on the last stage's windows (the parent's scores are kept). A structure's score on a
stage is the window-weighted mean of its scores on the chunks of windows up to that stage, each chunk scored once.
Resuming: the draws depend only on the seed and the scores, so a search given the chunk scores of an earlier run
(`memo`) replays its generations without scoring anything and goes on where it stopped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from adapruner.choosing.allocation import Counts
from adapruner.errors import AdaPrunerError
from adapruner.searching.widths import Module, WidthSpace

MAX_SWAPS = 3  # a child is its parent after 1 … MAX_SWAPS step moves (EvoPress mutates by a few level switches too)
Units = dict[Module, int]
ChunkScore = Callable[[Counts, int], float]  # (counts, chunk index) → mean score over that chunk's windows
Key = tuple[tuple[Module, int], ...]
Record = Callable[[int, list[tuple[Units, list[float]]]], None]  # (generation, structures scored anew, their chunks)


def key_of(units: Units) -> Key:
    """A structure's key in the memo of chunk scores."""
    return tuple(sorted(units.items()))


@dataclass(frozen=True)
class Stages:
    """Cumulative windows per stage, e.g. (16, 64, 128), and the children kept after each stage but the last."""

    windows: tuple[int, ...]
    survivors: tuple[int, ...]

    def __post_init__(self):
        if not self.windows or list(self.windows) != sorted(set(self.windows)) or self.windows[0] < 1:
            raise AdaPrunerError(f"stage windows {self.windows} must grow from at least 1: e.g. 16,64,128")
        if len(self.survivors) != len(self.windows) - 1 or any(s < 1 for s in self.survivors):
            raise AdaPrunerError(f"pass one survivor count ≥ 1 per stage but the last (stages {self.windows})")

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """(first window, end) of each stage's new windows."""
        return list(zip((0, *self.windows[:-1]), self.windows))


@dataclass(frozen=True)
class Schedule:
    """How long and how wide the evolution runs: `generations` of `children` each, drawn from `seed`."""

    generations: int
    children: int = 8
    seed: int = 0


@dataclass
class Evolution:
    """The search's result: the best units found and, per generation, the parent's score on the last stage."""

    best: Counts
    history: list[float] = field(default_factory=list)
    children: int = 0
    replaced: int = 0


def step_of(space: WidthSpace, module: Module) -> int:
    """Units one mutation step moves in `module`: 1 attention unit; MLP blocks worth one attention unit of its layer
    (n_m / 8 blocks where attention is not searched), at least one."""
    if module[1] == "attn":
        return 1
    attention = (module[0], "attn")
    if attention in space.prices:
        return max(1, round(space.prices[attention] / space.prices[module]))
    return max(1, space.units[module] // 8)


def repaired(space: WidthSpace, units: Units, draw: random.Random) -> Units:
    """`units` brought to T ≤ removed < T + (one MLP block): random MLP blocks added, then taken back."""
    units, mlps = dict(units), [m for m in space.units if m[1] == "mlp"]
    room = [m for m in mlps if units[m] < space.units[m] - space.floors[m]]
    while space.removed(units) < space.target:
        if not room:
            raise AdaPrunerError("the MLPs cannot reach the budget above their floors: lower --target-params")
        module = draw.choice(room)
        units[module] += 1
        if units[module] == space.units[module] - space.floors[module]:
            room.remove(module)
    givers = [m for m in mlps if units[m] > 0]
    while givers:
        module = draw.choice(givers)
        trial = {**units, module: units[module] - 1}
        if space.removed(trial) < space.target:
            givers.remove(module)
            continue
        units = trial
        if units[module] == 0:
            givers.remove(module)
    return units


def mutated(space: WidthSpace, units: Units, swaps: int, draw: random.Random) -> Units:
    """`units` after `swaps` step moves between random module pairs (module docstring), repaired to the budget."""
    child = dict(units)
    modules = list(space.units)
    for _ in range(swaps):
        takers = [m for m in modules if child[m] + step_of(space, m) <= space.units[m] - space.floors[m]]
        givers = [m for m in modules if child[m] >= step_of(space, m)]
        if not takers or not givers:
            break
        taker = draw.choice(takers)
        giver = draw.choice([m for m in givers if m != taker] or givers)
        child[taker] += step_of(space, taker)
        child[giver] -= step_of(space, giver)
    return repaired(space, child, draw)


def evolve(
    space: WidthSpace,
    start: Counts,
    score: ChunkScore,
    stages: Stages,
    schedule: Schedule,
    progress: str | None = "generations",
    memo: dict[Key, list[float]] | None = None,
    record: Record | None = None,
) -> Evolution:
    """The (1+λ) search from `start` (module docstring): `score(counts, chunk)` is the mean objective on chunk `chunk`
    of `stages.chunks` (lower is better). `memo` (key → chunk scores, filled in place) holds what an earlier run
    scored; `record(generation, scored)` hears, after the start (generation 0) and after each generation, the
    structures whose chunk scores grew in it; `progress` labels the progress bar (None: none)."""
    draw = random.Random(schedule.seed)
    sizes = [end - begin for begin, end in stages.chunks]
    scored = {} if memo is None else memo
    grown: dict[Key, Units] = {}

    def on_stage(units: Units, stage: int) -> float:
        key = key_of(units)
        chunks = scored.setdefault(key, [])
        while len(chunks) <= stage:
            chunks.append(score(space.layer_counts(units), len(chunks)))
            grown[key] = units
        return sum(c * n for c, n in zip(chunks[: stage + 1], sizes)) / stages.windows[stage]

    def report(generation: int) -> None:
        if record is not None and grown:
            record(generation, [(units, list(scored[key])) for key, units in grown.items()])
        grown.clear()

    parent = space.module_counts(start)
    last = len(stages.windows) - 1
    result = Evolution(start, [on_stage(parent, last)])
    report(0)
    for generation in tqdm(range(1, schedule.generations + 1), desc=progress, disable=progress is None):
        pool = [mutated(space, parent, draw.randint(1, MAX_SWAPS), draw) for _ in range(schedule.children)]
        result.children += len(pool)
        for stage, keep in enumerate(stages.survivors):
            pool = sorted(pool, key=lambda units, stage=stage: on_stage(units, stage))[:keep]
        best = min(pool, key=lambda units: on_stage(units, last))
        if on_stage(best, last) < on_stage(parent, last):
            parent, result.replaced = best, result.replaced + 1
        result.history.append(on_stage(parent, last))
        report(generation)
    result.best = space.layer_counts(parent)
    return result
