"""Speed measures time what they say: prefill runs `batch × prefill_len` tokens per timed forward, decode runs
`new_tokens` single-token steps on the KV cache; ratios are pruned over dense; `eval --speed` reports them."""

import json

from adapruner.evaluation.speed import SpeedShape, measure_speed, speedups
from tests.models import tiny_llama


def test_speed_measures_run_the_shapes_they_report():
    model = tiny_llama(n_heads=4, n_kv=2)
    calls = []
    model.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    shape = SpeedShape(prefill_len=16, batches=(1, 3), prompt_len=4, new_tokens=5, repeats=2)
    speeds = measure_speed(model, shape)
    assert set(speeds) == {"prefill_b1_tok_s", "prefill_b3_tok_s", "decode_b1_tok_s"} and min(speeds.values()) > 0
    runs = 1 + shape.repeats  # a warm-up, then the timed runs
    assert calls[: 2 * runs] == [(1, 16)] * runs + [(3, 16)] * runs
    decode = calls[2 * runs :]
    assert decode == ([(1, 4)] + [(1, 1)] * 4) * runs  # the prompt, then one token per step


def test_speedups_are_pruned_over_dense():
    assert speedups({"a": 10.0, "b": 4.0}, {"a": 15.0, "b": 4.0, "c": 1.0}) == {"a": 1.5, "b": 1.0}


def test_eval_speed_reports_tokens_per_second(tmp_path, capsys):
    from adapruner.cli import main
    from tests.helpers import save_tiny_model

    save_tiny_model(tmp_path / "model")
    assert main(["eval", "--model", str(tmp_path / "model"), "--no-ppl", "--speed", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "model" / "report.json").read_text())
    rates = dict(_numbers_named(report, ("prefill_b8_tok_s", "decode_b1_tok_s")))
    assert set(rates) == {"prefill_b8_tok_s", "decode_b1_tok_s"}
    assert all(0 < rate < 1e9 for rate in rates.values()), rates  # measured rates: positive and finite
    printed = capsys.readouterr().out
    assert all(f"{name} {rate:.4g}" in printed for name, rate in rates.items()), printed  # the table shows them


def _numbers_named(tree, names):
    """(key, value) of every number under one of `names` anywhere in a JSON tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in names and isinstance(value, (int, float)):
                yield key, float(value)
            yield from _numbers_named(value, names)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers_named(value, names)
