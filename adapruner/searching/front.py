"""`front.json`: the best structure a widths search found at each budget of its front (`search --front`), each a
best.json record; `prune --from-study DIR --target-params p` delivers the one at p."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from adapruner.data.corpora import read_utf8
from adapruner.errors import AdaPrunerError
from adapruner.output.report import write_json_atomic
from adapruner.searching.best_trial import BestTrial

FRONT_FORMAT = "adapruner.front/1"
FRONT_FILE = "front.json"


def write_front(path: Path, points: list[BestTrial]) -> None:
    write_json_atomic(path, {"format": FRONT_FORMAT, "points": [asdict(point) for point in points]})


def budget_of(point: BestTrial) -> float | None:
    return point.prune_spec.target_params


def read_front(path: Path) -> list[BestTrial]:
    """The points of `path` (one-line errors for a file adapruner did not write)."""
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or data.get("format") != FRONT_FORMAT or not isinstance(data.get("points"), list):
        raise AdaPrunerError(f"{path} is not a front adapruner {FRONT_FORMAT} wrote: rerun the search with --front")
    return [BestTrial.from_data(point, path) for point in data["points"]]


def delivered_at(study_dir: Path, best: BestTrial, budget: float) -> BestTrial:
    """The structure a search found at `budget`: best.json's where it is of that budget, else the front's point."""
    if budget_of(best) is not None and math.isclose(budget_of(best), budget):
        return best
    front = study_dir / FRONT_FILE
    searched = read_front(front) if front.is_file() else [best]
    for point in searched:
        if budget_of(point) is not None and math.isclose(budget_of(point), budget):
            return point
    budgets = ",".join(f"{budget_of(p):g}" for p in searched if budget_of(p) is not None) or "none (a ratio)"
    hint = "" if front.is_file() else " (search several with --structure widths --front)"
    raise AdaPrunerError(
        f"the study in {study_dir} searched --target-params {budgets}, not {budget:g}: pass one of them{hint}, "
        "or drop --target-params"
    )
