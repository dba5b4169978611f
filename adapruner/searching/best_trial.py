"""`best.json`: what a search found — its configuration, the (pool, index) address of every sample, and the plan
the best trial scored — written from and read back into one dataclass."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.spec import PruneSpec
from adapruner.data.corpora import read_utf8
from adapruner.errors import AdaPrunerError
from adapruner.output.report import write_json_atomic

# /2: the scored plan; /3: budget, allocation, compensation; /4: the pruning spec whole; /5: its MLP alignment;
# /6: the refit pool; /7: the structure searched (a widths search's plan is its result) and the validation KL
BEST_FORMAT = "adapruner.best/7"
PREVIOUS_FORMAT = "adapruner.best/6"  # read as /7 with the fields /7 added at their defaults (`ADDED_FIELDS`)
ADDED_FIELDS = {"structure": "config", "val_kl": None}


@dataclass
class BestTrial:
    """The best trial of a study, with everything needed to deliver exactly the model it scored."""

    model: str
    spec: dict  # `PruneSpec.to_dict()` of the best trial: the study's fixed part with the trial's choices
    seq_len: int
    val_ppl: float
    trial: int
    sampler: str
    seed: int
    samples: list[int]  # indices into the cached candidate pool
    blocks: list[str]
    addresses: list[list]  # (pool, window index) of every sample
    placement: dict[str, str]  # device, dtype and val_dtype the trials ran in
    backends: dict[str, str]  # which implementation scored and which gathers
    val_windows: int
    batch_size: int
    plan: dict  # `PrunePlan.to_dict()` of the scored plan
    removed_fraction: float  # of all the model's parameters, by the plan (compensation biases not counted)
    refit_calib: str | None = None  # the refit pool's windows (drawn with `seed`, `seq_len` tokens); None: none
    statistics: str = "subset"  # where the units were scored: the `samples`, or the refit pool
    structure: str = "config"  # config: the plan follows from `spec`; widths: the searched per-layer widths
    val_kl: float | None = None  # a widths search's mean KL from the dense model on the validation windows
    format: str = field(default=BEST_FORMAT)

    @property
    def prune_spec(self) -> PruneSpec:
        return PruneSpec.from_dict(self.spec)

    @property
    def scored_on(self) -> str:
        """Where the best trial's units were scored, and its refit windows, in words."""
        where = (
            f"the refit pool ({self.refit_calib})"
            if self.statistics == "refit"
            else f"{len(self.samples)} samples (blocks {', '.join(self.blocks)})"
        )
        refit = self.prune_spec.compensation != "none" and self.refit_calib and self.statistics != "refit"
        return where + (f", refit on {self.refit_calib}" if refit else "")

    @property
    def prune_plan(self) -> PrunePlan:
        return PrunePlan.from_dict(self.plan)

    def write(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> BestTrial:
        """Read `path`; a file of another format (an older or newer adapruner) is a one-line error."""
        if not path.is_file():
            raise AdaPrunerError(f"{path} not found: pass the --out directory of a finished `adapruner search`")
        try:
            data = json.loads(read_utf8(path))
        except json.JSONDecodeError as exc:
            raise AdaPrunerError(
                f"{path}:{exc.lineno}: not valid JSON: pass the --out directory of a finished `adapruner search`"
            ) from None
        return cls.from_data(data, path)

    @classmethod
    def from_data(cls, data: object, path: Path) -> BestTrial:
        """The record `data` read from `path`; another format (an older or newer adapruner) is a one-line error."""
        if not isinstance(data, dict):
            data = {}
        names = {f.name for f in fields(cls)}
        if data.get("format") == PREVIOUS_FORMAT and set(data) == names - set(ADDED_FIELDS):  # a config search's
            data = {**data, **ADDED_FIELDS, "format": BEST_FORMAT}
        if data.get("format") != BEST_FORMAT or set(data) != names:
            raise AdaPrunerError(
                f"{path} was written by another adapruner version (format {data.get('format')!r}, "
                f"this one reads {BEST_FORMAT!r}): rerun the search"
            )
        return cls(**data)
