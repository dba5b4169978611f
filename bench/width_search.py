"""Does a search over per-layer widths beat the `loss` allocation? `python -m bench.width_search` (issue 33, step 1).

SmolLM2-135M with `best`'s choices (fluct scores, lsq refit at damp 0.3, query heads, every layer), all read from the
256-window wiki refit pool, at each `--targets` fraction of all parameters removed:
  loss     the `loss` allocation's counts (what `adapruner prune` does with no flag), the study's first trial;
  searched `--trials` trials of Optuna's `--sampler` over per-module shares (`adapruner.searching.widths`), drawn as
           w_m = max(0, (w_m(loss) + ε) · exp(u_m) − ε) with u_m ∈ [−spread, spread] (u = 0: the loss counts; before
           issue 33's second step the − ε was missing, so trial 0 was near them, not them), repaired to the
           budget, scored on `--val-windows` wiki validation windows (prefix cached, as search trials) by
           `--objective`: perplexity, or the mean KL divergence from the dense model on its top 64 tokens
           (`adapruner.evaluation.divergence`).
  or, with `--sampler evolution`, the (1+λ) evolution from the loss counts (`adapruner.searching.width_study`,
           what `adapruner search --structure widths` runs):
           `--children` per generation, `--trials` children in all, multi-step selection on `--stages` windows
           (`--survivors` kept after each stage but the last); its validation values are the parent's on the last
           stage's windows (the objective's log for perplexity).
Both are then scored on the first `--max-eval-windows` wiki evaluation windows (bench.quality's protocol). Printed:
evaluation perplexity of each, searched / loss, the validation perplexities, seconds per trial; JSON to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import optuna

from adapruner.choosing.selection import allocate
from adapruner.cutting.removal import cut
from adapruner.data.calibration import pool_windows
from adapruner.evaluation.evaluate import perplexity
from adapruner.model.models import load_model
from adapruner.model.structure import decoder_layers
from adapruner.output.report import format_table
from adapruner.recipes import recipe_prune_options
from adapruner.scoring.refit_pool import load_or_collect
from adapruner.searching.evolution import Stages
from adapruner.searching.trial_scorer import ValidationScorer
from adapruner.searching.width_study import WidthSearch, WidthStudy
from adapruner.searching.widths import LayerVariants, WidthSpace

EPSILON = 0.02  # the share a module the loss allocation leaves whole starts from
SAMPLERS = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=16),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def searched_counts(variants, space, start, scorer, args) -> tuple[dict, list[float], float]:
    """The best counts of `args.trials` trials (trial 0: `start`), the validation perplexity of each trial, and the
    seconds per trial."""
    modules = list(space.units)
    names = {m: f"u_{m[0]}_{m[1]}" for m in modules}
    base = space.shares(start)
    study = optuna.create_study(sampler=SAMPLERS[args.sampler](args.seed))
    study.enqueue_trial({names[m]: 0.0 for m in modules})

    def objective(trial) -> float:
        shares = {
            m: max(
                0.0, (base[m] + EPSILON) * math.exp(trial.suggest_float(names[m], -args.spread, args.spread)) - EPSILON
            )
            for m in modules
        }
        counts = space.counts(shares)
        trial.set_user_attr("counts", {str(i): list(c) for i, c in counts.items()})
        plan, updates = variants.plan(counts), variants.updates(counts)
        return scorer.kl(plan, updates) if args.objective == "kl" else scorer.score(plan, None, updates)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    study.optimize(objective, n_trials=args.trials, show_progress_bar=True)
    seconds = (time.perf_counter() - started) / args.trials
    best = {int(i): tuple(c) for i, c in study.best_trial.user_attrs["counts"].items()}
    return best, [t.value for t in study.trials], seconds


def evolved_counts(searched: WidthStudy) -> tuple[dict, list[float], float]:
    """The (1+λ) evolution's best counts from the loss counts (`adapruner.searching.width_study`, in an in-memory
    study), the parent's score per generation on the last stage's windows, and the seconds per child."""
    study = optuna.create_study()
    started = time.perf_counter()
    result = searched.run(study)[searched.spec.target_params]
    return result.best, result.history, (time.perf_counter() - started) / max(1, result.children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="0.2,0.12", help="fractions of all parameters removed")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--sampler", default="tpe", choices=(*SAMPLERS, "evolution"))
    parser.add_argument("--children", type=int, default=8, help="evolution: children per generation")
    parser.add_argument("--stages", default="16,64,128", help="evolution: cumulative validation windows per stage")
    parser.add_argument("--survivors", default="3,1", help="evolution: children kept after each stage but the last")
    parser.add_argument("--objective", default="ppl", choices=("ppl", "kl"), help="what a trial minimises")
    parser.add_argument("--spread", type=float, default=1.0, help="u_m ∈ [−spread, spread]: shares within e^±spread")
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--max-eval-windows", type=int, default=200)
    parser.add_argument("--refit-calib", default="wiki:256")
    parser.add_argument("--min-keep", type=float, default=None, help="0 lets whole blocks go (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pool-file", default="runs/width-search-pool.safetensors", help="the refit pool, reused when it matches"
    )
    parser.add_argument("--out", default="bench/results/width_search.json")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2")
    layers = range(len(decoder_layers(model)))
    started = time.perf_counter()
    windows = (args.refit_calib, 128, args.seed)
    pool = load_or_collect(model, tokenizer, windows, layers, Path(args.pool_file), progress=True, fisher=True)
    pool_seconds = time.perf_counter() - started
    val_all = pool_windows(tokenizer, "wiki", 128, "val")
    val = val_all[: args.val_windows]
    evaluation = pool_windows(tokenizer, "wiki", 128, "eval")[: args.max_eval_windows]
    scorer = ValidationScorer(model, val, 0, "float32")
    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        spec = recipe_prune_options("best", target_params=target).spec
        spec = spec if args.min_keep is None else spec.with_(min_keep=args.min_keep)
        if args.sampler == "evolution":
            stages = Stages(tuple(map(int, args.stages.split(","))), tuple(map(int, args.survivors.split(","))))
            search = WidthSearch(stages, args.children, args.trials, args.objective, args.seed)
            searched = WidthStudy(model, spec, pool, val_all, search)
            space, variants, loss = searched.space, searched.variants, searched.start
            best, values, seconds = evolved_counts(searched)
        else:
            space, variants = WidthSpace.of(model, spec), LayerVariants(model, spec, pool, args.seed)
            loss = allocate(model, variants.importance, spec)[0]
            best, values, seconds = searched_counts(variants, space, loss, scorer, args)
        measured = {}
        for name, counts in (("loss", loss), ("searched", best)):
            pruned = copy.deepcopy(model)
            cut(pruned, variants.plan(counts), variants.updates(counts))
            measured[name] = perplexity(pruned, evaluation, desc=name)
        rows.append(
            {
                "target": target,
                "loss_ppl": measured["loss"],
                "searched_ppl": measured["searched"],
                "ratio": measured["searched"] / measured["loss"],
                "val_loss": values[0],  # the objective's value (perplexity or KL) on the validation windows
                "val_best": min(values),
                "trials": args.trials,
                "sampler": args.sampler,
                "objective": args.objective,
                "spread": args.spread,
                "stages": [args.stages, args.survivors, args.children] if args.sampler == "evolution" else None,
                "min_keep": spec.min_keep,
                "removed_blocks": {
                    kind: [i for i, c in best.items() if c[k] == space.units[(i, kind)] * (space.align if k else 1)]
                    for k, kind in enumerate(("attn", "mlp"))
                },
                "seconds_per_trial": seconds,
                "searched_counts": {str(i): list(c) for i, c in best.items()},
                "loss_counts": {str(i): list(c) for i, c in loss.items()},
            }
        )
        print(f"{target}: loss {measured['loss']:.2f}, searched {measured['searched']:.2f}")
    table = [
        [
            r["target"],
            f"{r['loss_ppl']:.2f}",
            f"{r['searched_ppl']:.2f}",
            f"{r['ratio']:.3f}",
            f"{r['val_loss']:.4g}",
            f"{r['val_best']:.4g}",
            f"{r['seconds_per_trial']:.1f}",
        ]
        for r in rows
    ]
    headers = ["removed", "eval loss", "eval searched", "searched / loss", f"val {args.objective}: loss", "best"]
    headers.append("s/trial")
    print(format_table(headers, table))
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}"
    about = {"machine": machine, "refit_pool_seconds": pool_seconds, "eval_windows": int(evaluation.shape[0])}
    Path(args.out).write_text(json.dumps(about | {"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out} (refit pool read or collected in {pool_seconds:.0f} s)")


if __name__ == "__main__":
    main()
