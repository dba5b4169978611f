"""adapruner: sample-aware adaptive structured pruning of LLaMA-family models.

The public API, importable from the package root (loaded on first use, so `import adapruner` stays light):

    model, tokenizer = adapruner.load_model("smollm2")                     # HF directory, hub id or "smollm2"
    options = adapruner.recipe_prune_options("best", target_params=0.2)    # what `adapruner prune` does by default
    spec = adapruner.PruneSpec(target_params=0.2, metric="act", allocation="global", compensation="lsq")
    result = adapruner.prune_model(model, tokenizer, adapruner.PruneOptions(spec))
    adapruner.save_pruned(model, tokenizer, "out/pruned")
    best = adapruner.run_search(adapruner.SearchOptions(model="smollm2", trials=20), Path("runs/s"))
    adapruner.apply_study_plan(dense, best, tokenizer)                      # the plan the best trial scored
    scores = adapruner.Importance("taylor2", "sum", stats)(group)          # Torch-Pruning's Importance shape
"""

from __future__ import annotations

from importlib import import_module

from adapruner.errors import AdaPrunerError

__version__ = "0.1.0"

_PUBLIC = {  # name → the module that defines it
    "load_model": "adapruner.model.models",
    "PruneSpec": "adapruner.choosing.spec",
    "PruneOptions": "adapruner.cutting.pruning",
    "PruneResult": "adapruner.cutting.pruning",
    "prune_model": "adapruner.cutting.pruning",
    "apply_study_plan": "adapruner.cutting.pruning",
    "SearchOptions": "adapruner.searching.search_options",
    "run_search": "adapruner.commands.search",
    "BestTrial": "adapruner.searching.best_trial",
    "Importance": "adapruner.scoring.importance",
    "LinearStats": "adapruner.scoring.importance",
    "METRICS": "adapruner.scoring.metrics",
    "PrunePlan": "adapruner.choosing.plan",
    "plan_allocation": "adapruner.choosing.selection",
    "apply_plan": "adapruner.cutting.removal",
    "count_params": "adapruner.choosing.allocation",
    "save_pruned": "adapruner.output.saving",
    "LoraOptions": "adapruner.evaluation.finetune",
    "finetune_and_save": "adapruner.commands.finetune",
    "EvalOptions": "adapruner.commands.eval",
    "evaluate_model": "adapruner.commands.eval",
    "RunOptions": "adapruner.commands.run",
    "run_pipeline": "adapruner.commands.run",
    "collect_stats": "adapruner.scoring.collect",
    "recipe_prune_options": "adapruner.recipes",
    "recipe_search_options": "adapruner.recipes",
}
__all__ = ["AdaPrunerError", "__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapruner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
