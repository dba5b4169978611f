"""Zero-shot accuracy through lm-evaluation-harness, with offline tasks built from the held-out wiki articles.

Offline tasks (4-way multiple choice, accuracy and length-normalised accuracy as lm-eval reports them), built
only from the wiki *evaluation* articles (never calibration or validation text), with a fixed seed:
  adapruner_cloze     context: 3 consecutive sentences of an article; choices: the true next sentence and 3
                      sentences drawn from other evaluation articles.
  adapruner_lastword  context: a sentence (and the one before it) without its last word; choices: the true last
                      word and 3 words that end other sentences of other articles.
Standard lm-eval tasks (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, …) run too
whenever their data sets are already in the local datasets cache.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from adapruner.data.corpora import wiki_split
from adapruner.devices import model_device
from adapruner.errors import AdaPrunerError

OFFLINE_TASKS = ("adapruner_cloze", "adapruner_lastword")
ITEMS_PER_TASK = 300
TASK_SEED = 1234
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(text: str) -> list[str]:
    """Sentences of 6–60 words (headings, lists and fragments dropped)."""
    out = []
    for paragraph in text.split("\n"):
        for sentence in SENTENCE.split(paragraph.strip()):
            words = sentence.split()
            if 6 <= len(words) <= 60 and sentence[-1] in ".!?":
                out.append(" ".join(words))
    return out


def build_cloze(articles: list[list[str]], n_items: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    spots = [(a, i) for a, sents in enumerate(articles) for i in range(3, len(sents))]
    rng.shuffle(spots)
    items = []
    for a, i in spots[:n_items]:
        others = [s for b, sents in enumerate(articles) if b != a for s in sents]
        choices = [articles[a][i], *rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        items.append(
            {
                "context": " ".join(articles[a][i - 3 : i]),
                "choices": [choices[k] for k in order],
                "gold": order.index(0),
            }
        )
    return items


def build_lastword(articles: list[list[str]], n_items: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    last_word = lambda s: re.sub(r"[^\w'-]", "", s.split()[-1])  # noqa: E731
    spots = [(a, i) for a, sents in enumerate(articles) for i in range(1, len(sents)) if last_word(sents[i]).isalpha()]
    rng.shuffle(spots)
    items = []
    for a, i in spots[:n_items]:
        gold = last_word(articles[a][i])
        pool = sorted(
            {
                last_word(s)
                for b, sents in enumerate(articles)
                if b != a
                for s in sents
                if last_word(s).isalpha() and last_word(s) != gold
            }
        )
        choices = [gold, *rng.sample(pool, 3)]
        order = list(range(4))
        rng.shuffle(order)
        context = articles[a][i - 1] + " " + " ".join(articles[a][i].split()[:-1])
        items.append({"context": context, "choices": [choices[k] for k in order], "gold": order.index(0)})
    return items


def build_offline_tasks(directory: Path, n_items: int = ITEMS_PER_TASK, seed: int = TASK_SEED) -> Path:
    """Write the task data (JSONL) and lm-eval task YAMLs into `directory`; same inputs → same bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    articles = [s for s in (sentences(text) for text in wiki_split("eval")) if len(s) >= 4]
    builders = {"adapruner_cloze": build_cloze, "adapruner_lastword": build_lastword}
    for name, build in builders.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in build(articles, n_items, seed)))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{context}}"\n'
            "doc_to_choice: choices\n"
            "doc_to_target: gold\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        )
    return directory


def task_manager(tasks: list[str], task_dir: Path):
    """An lm-eval TaskManager that knows our offline tasks (and the standard ones when asked for); unknown → error."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise AdaPrunerError(
            "zero-shot tasks need lm-evaluation-harness: run `pip install 'adapruner[eval]'`"
        ) from None
    build_offline_tasks(task_dir)
    manager = TaskManager(include_path=str(task_dir), include_defaults=any(t not in OFFLINE_TASKS for t in tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise AdaPrunerError(
            f"unknown task {unknown[0]!r}: use {', '.join(OFFLINE_TASKS)} or an lm-eval task name (boolq, piqa, …)"
        )
    return manager


def evaluate_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    task_dir: Path,
    batch_size: int = 8,
    limit: int | None = None,
    manager=None,
) -> dict[str, dict[str, float]]:
    """{task: {"acc": …, "acc_norm": …}} from lm-eval's `simple_evaluate` over our HF model object.

    A caller evaluating several models passes one `task_manager(tasks, task_dir)` so the tasks are built once."""
    manager = manager or task_manager(tasks, task_dir)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    lm._device = model_device(model)  # HFLM takes the first parameter's device: meta where a spread model offloads it
    try:
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    except (ConnectionError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise AdaPrunerError(
            f"task data unavailable offline ({first}): standard tasks need their data in the local datasets cache"
        ) from None
    return {
        task: {metric: float(values[f"{metric},none"]) for metric in ("acc", "acc_norm") if f"{metric},none" in values}
        for task, values in results["results"].items()
    }
