"""The settings of a search (`SearchOptions`): what it searches (the study's set-up, fixed for its life) and how it
runs (`how` fields, free to change on a resume); the search's record file read back (`search_record`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from adapruner.choosing.spec import PruneSpec
from adapruner.data.calibration import DEFAULT_SEQ_LEN
from adapruner.errors import AdaPrunerError
from adapruner.searching.evolution import Stages
from adapruner.searching.search import SearchSpace

STUDY_FILE = "study.db"
STRUCTURES = ("config", "widths")
WIDTHS_ONLY = ("objective", "stages", "survivors", "children", "front")  # fields a config search does not read
OBJECTIVES = ("kl", "ppl")  # a structure's score: mean KL from the dense model, or the log of its perplexity


@dataclass(frozen=True)
class WidthSearch:
    """How the evolution runs: `trials` children drawn in all (per budget), `children` per generation, multi-step
    selection on `stages`, scored by `objective`; one evolution per budget of `front` (ascending; empty: the spec's
    budget alone)."""

    stages: Stages
    children: int = 8
    trials: int = 96
    objective: str = "kl"
    seed: int = 0
    front: tuple[float, ...] = ()

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise AdaPrunerError(f"--objective {self.objective}: use {' or '.join(OBJECTIVES)}")
        if self.children < 1 or self.trials < 1:
            raise AdaPrunerError("--children and --trials must be at least 1")
        if list(self.front) != sorted(set(self.front)) or not all(0 < b < 1 for b in self.front):
            raise AdaPrunerError(f"--front {self.front}: list growing budgets in (0, 1), e.g. 0.2,0.35,0.5")

    @property
    def generations(self) -> int:
        return math.ceil(self.trials / self.children)


def how(default):
    """A field that says how a search runs, not what it searches: left out of the study's set-up, so a study
    resumes with other values of it."""
    return field(default=default, metadata={"setup": False})


@dataclass
class SearchOptions:
    """Every setting of a search. Fields made with `how` may change between runs of one study; any other field is
    part of the study's set-up (`study_setup`), and a run with another value of it is refused."""

    model: str = "smollm2"
    spec: PruneSpec = field(
        default_factory=PruneSpec
    )  # budget, layers, granularity, modules, min-keep, damp; trials choose the rest
    pools: list[str] = field(default_factory=lambda: ["wiki", "news", "plays"])
    pool_size: int = 32
    seq_len: int = DEFAULT_SEQ_LEN
    metrics: tuple[str, ...] = SearchSpace.metrics
    aggregations: tuple[str, ...] = SearchSpace.aggregations
    sample_counts: tuple[int, ...] = SearchSpace.sample_counts
    blocks_per_pool: int = SearchSpace.blocks_per_pool
    depth_slope: float = SearchSpace.depth_slope
    allocations: tuple[str, ...] = SearchSpace.allocations
    compensations: tuple[str, ...] = SearchSpace.compensations
    statistics: tuple[str, ...] = SearchSpace.statistics
    refit_calib: str | None = None  # the refit pool's windows (POOL:N[,POOL:N]); None: trials refit on their subset
    trials: int = how(40)
    startup_trials: int | None = how(None)  # TPE's random start-up trials; None: a quarter of `trials` (at least 1)
    sampler: str | None = how(None)  # config: tpe (default) or random; widths: evolution
    seed: int = 0
    val_windows: int = 16  # a structure search scores on `stages[-1]` windows instead
    structure: str = "config"  # config: trials choose metric, samples, allocation; widths: the per-layer widths
    objective: str = "kl"  # what a structure trial minimises: kl (from the dense model) or ppl (its log)
    stages: tuple[int, ...] = (16, 64, 128)  # structure search: cumulative validation windows per selection stage
    survivors: tuple[int, ...] = (3, 1)  # structure search: children kept after each stage but the last
    children: int = 8  # structure search: children per generation (the draws follow it: part of the set-up)
    front: tuple[float, ...] = ()  # structure search: the budgets searched (one evolution each); () = --target-params
    val_data: str | None = None  # the trials' validation text (a pool spec: file/dataset path); None: wiki's split
    val_dtype: str = "auto"
    batch_size: int = how(8)
    workers: int = how(1)
    early_stop: bool = False
    storage: str | None = how(None)
    study: str = how("adapruner")
    cache_dir: str | None = how(None)
    cache_dtype: str = "bfloat16"
    cache_mem_gb: float = how(8.0)
    device: str = how("auto")
    dtype: str = "auto"
    trust_remote_code: bool = how(False)  # run Python code shipped with the model (off unless asked)
    device_map: str | None = how(
        None
    )  # spread the model with accelerate (`adapruner.model.big_model`): a strategy or a JSON file
    max_memory: str | None = how(None)  # with device_map: e.g. "0=70GiB,cpu=200GiB"
    offload_dir: str | None = how(None)  # with device_map: where weights put on disk go

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise AdaPrunerError(f"--structure {self.structure}: use {' or '.join(STRUCTURES)}")
        widths = self.structure == "widths"
        self.sampler = self.sampler or ("evolution" if widths else "tpe")
        if widths != (self.sampler == "evolution"):
            raise AdaPrunerError(
                f"--sampler {self.sampler} does not search --structure {self.structure}: the evolution searches "
                "widths, tpe or random search configurations"
            )
        if self.front and not widths:
            raise AdaPrunerError("--front searches per-layer widths at several budgets: add --structure widths")
        if self.front and self.spec.target_params is None:  # best.json and `run` deliver the largest budget
            self.spec = self.spec.with_(target_params=self.front[-1])
        if self.front and self.spec.target_params not in self.front:
            raise AdaPrunerError(
                f"--target-params {self.spec.target_params} is the budget best.json delivers: pass one of --front's "
                f"{','.join(map(str, self.front))}"
            )
        if widths:
            self.width_search()  # checked: stages, survivors, objective, children, trials, front

    def width_search(self) -> WidthSearch:
        """How a widths search runs (`WidthSearch`, which checks it)."""
        stages = Stages(tuple(self.stages), tuple(self.survivors))
        return WidthSearch(stages, self.children, self.trials, self.objective, self.seed, tuple(self.front))

    @property
    def space(self) -> SearchSpace:
        """What a trial may choose: the space fields of these options (checked)."""
        return SearchSpace(**{f.name: getattr(self, f.name) for f in fields(SearchSpace)})


def study_setup(options: SearchOptions) -> dict:
    """The fields that define the study (all but the `how` ones; a config search's without the structure search's
    own), as the storage returns them (tuples → lists)."""
    values = asdict(options)
    unused = WIDTHS_ONLY if options.structure == "config" else ()
    setup = {f.name: values[f.name] for f in fields(options) if f.metadata.get("setup", True) and f.name not in unused}
    return json.loads(json.dumps(setup))


def startup_trials(options: SearchOptions) -> int:
    """TPE's random start-up trials: as given, else a quarter of the budget (at least one)."""
    return options.startup_trials if options.startup_trials is not None else max(1, options.trials // 4)


def search_record(folder: Path, fix: str) -> dict:
    """The options a search recorded in `folder/search.json`; a file adapruner did not write is a one-line error
    ending in `fix`."""
    record = folder / "search.json"
    try:
        options = json.loads(record.read_text(encoding="utf-8"))["options"]
        if not isinstance(options, dict):
            raise TypeError
        return options
    except (ValueError, KeyError, TypeError):
        raise AdaPrunerError(f"{record} is not a search record adapruner wrote: {fix}") from None
