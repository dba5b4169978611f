"""The walk of one `prune`: which modules `prune_model` steps into and how often, `python -m bench.walk`.

A profile hook sees every Python call during one `prune_model` (a recipe, `best` by default: fluct scores, the loss
allocation, lsq refit; on a tiny random LLaMA and 16 wiki windows). The walk is the calls that `cutting/pruning.py`
itself makes into other modules of the package: each is one step of needs → statistics → plan → refit → cut (what
a step calls in turn belongs to that step). Printed per module: how many times the walk enters it, and the functions
it calls there.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict

from adapruner.cutting.pruning import PruneOptions, prune_model
from adapruner.output.report import format_table
from adapruner.recipes import recipe_prune_options
from tests.models import tiny_llama, word_level_tokenizer

WALKER = "adapruner.cutting.pruning"


def walk(options: PruneOptions) -> tuple[Counter, dict[str, list[str]]]:
    """(entries per module, the functions entered there, in order) of one `prune_model` with `options`."""
    model, tokenizer = tiny_llama(6, 2, layers=4), word_level_tokenizer()
    entries, functions = Counter(), defaultdict(list)

    def profile(frame, event, _arg):
        if event != "call" or frame.f_back is None:
            return
        callee, caller = frame.f_globals.get("__name__", ""), frame.f_back.f_globals.get("__name__", "")
        if caller == WALKER and callee.startswith("adapruner.") and callee != WALKER:
            entries[callee] += 1
            functions[callee].append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        prune_model(model, tokenizer, options, progress=False)
    finally:
        sys.setprofile(None)
    return entries, functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="best")
    parser.add_argument("--calib", default="wiki:16")
    args = parser.parse_args()
    options = recipe_prune_options(args.recipe)
    entries, functions = walk(PruneOptions(spec=options.spec.with_(ratio=0.25), calib=args.calib, seq_len=32))
    rows = [[m.removeprefix("adapruner."), entries[m], ", ".join(dict.fromkeys(functions[m]))] for m in entries]
    print(format_table(["module", "entered", "functions"], rows))
    most = max(entries.values())
    print(f"steps of the walk: {sum(entries.values())} into {len(entries)} modules, at most {most} each")


if __name__ == "__main__":
    main()
