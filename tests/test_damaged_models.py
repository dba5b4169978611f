"""Damaged or inconsistent model directories (issue 23): every corruption, through every command that loads a model,
ends in exit 2 with one `error:` line naming the problem, no traceback and nothing written."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import run_cli, write_pool
from tests.models import tiny_llama, word_level_tokenizer

WEIGHTS = "model.safetensors"


def edit_config(**changes):
    def corrupt(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))

    return corrupt


def cut_weights(fraction: float):
    def corrupt(model: Path) -> None:
        data = (model / WEIGHTS).read_bytes()
        (model / WEIGHTS).write_bytes(data[: int(len(data) * fraction)])

    return corrupt


def replace_file(name: str, content: bytes | None):
    def corrupt(model: Path) -> None:
        if content is None:
            (model / name).unlink()
        else:
            (model / name).write_bytes(content)

    return corrupt


def shard(index_text: str | None = None, drop: int | None = None):
    """Split the weights into two shards with an index; then damage the index or drop a shard."""

    def corrupt(model: Path) -> None:
        tensors = load_file(model / WEIGHTS)
        (model / WEIGHTS).unlink()
        names = sorted(tensors)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        files = [f"model-0000{k + 1}-of-00002.safetensors" for k in range(2)]
        for file, part in zip(files, halves):
            save_file({n: tensors[n] for n in part}, model / file, metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {n: files[k] for k, part in enumerate(halves) for n in part}}
        (model / "model.safetensors.index.json").write_text(index_text or json.dumps(index))
        if drop is not None:
            (model / files[drop]).unlink()

    return corrupt


def poison(value: float, tensor: str = "model.layers.1.mlp.down_proj.weight"):
    def corrupt(model: Path) -> None:
        tensors = load_file(model / WEIGHTS)
        tensors[tensor][0, 0] = value
        save_file(tensors, model / WEIGHTS, metadata={"format": "pt"})

    return corrupt


def drop_tokenizer(model: Path) -> None:
    for file in model.iterdir():
        if "token" in file.name or file.name in ("vocab.json", "merges.txt"):
            file.unlink()


CORRUPTIONS = {  # name: (corruption, words the one error line must hold)
    "weights cut in half": (cut_weights(0.5), "not a whole safetensors file"),
    "weights cut to the header": (cut_weights(0.001), "not a whole safetensors file"),
    "weights are text": (replace_file(WEIGHTS, b"not a tensor file at all\n" * 40), "not a whole safetensors file"),
    "weights empty": (replace_file(WEIGHTS, b""), "not a whole safetensors file"),
    "weights missing": (replace_file(WEIGHTS, None), "holds no *.safetensors weights"),
    "a shard missing": (shard(drop=1), "is missing"),
    "shard index not json": (shard(index_text="{weight_map"), "not a safetensors index"),
    "shard index without weight_map": (shard(index_text='{"metadata": {}}'), "not a safetensors index"),
    "config not json": (replace_file("config.json", b"{model_type: llama"), "config"),
    "config missing": (replace_file("config.json", None), "config"),
    "zero kv heads": (edit_config(num_key_value_heads=0), "num_key_value_heads is 0"),
    "negative heads": (edit_config(num_attention_heads=-6), "num_attention_heads is -6"),
    "hidden size as text": (edit_config(hidden_size="48"), "hidden_size is '48'"),
    "zero layers": (edit_config(num_hidden_layers=0), "num_hidden_layers is 0"),
    "heads not a multiple of kv heads": (edit_config(num_attention_heads=5), "not a multiple of num_key_value_heads"),
    "heads do not divide hidden, no head_dim": (
        edit_config(num_attention_heads=7, num_key_value_heads=7, head_dim=None),
        "not divisible by num_attention_heads",
    ),
    "head_dim disagrees with the weights": (edit_config(head_dim=16), "the config does not belong to these weights"),
    "intermediate size disagrees": (edit_config(intermediate_size=32), "the config does not belong to these weights"),
    "vocab size disagrees": (edit_config(vocab_size=101), "the config does not belong to these weights"),
    "more layers than weights": (edit_config(num_hidden_layers=4), "has no weights for decoder layer 3"),
    "unknown architecture": (edit_config(model_type="gpt2"), "unsupported architecture"),
    "no tokenizer": (drop_tokenizer, "has no tokenizer"),
    "a NaN weight": (poison(float("nan")), "model.layers.1.mlp.down_proj.weight holds NaN or infinite"),
    "an infinite weight": (poison(float("inf"), "model.embed_tokens.weight"), "model.embed_tokens.weight holds NaN"),
}


def commands(model: Path, pool: Path, out: Path) -> dict[str, list[str]]:
    search = ["--model", str(model), "--pools", str(pool), "--pool-size", "2", "--seq-len", "8", "--layers", "all"]
    search += ["--metrics", "l2", "--sample-counts", "1", "--val-windows", "1", "--trials", "1", "--out", str(out)]
    return {
        "eval": ["eval", "--model", str(model), "--max-eval-windows", "1", "--seq-len", "8", "--tasks", ""],
        "prune": ["prune", "--model", str(model), "--metric", "l2", "--no-eval", "--layers", "all", "--out", str(out)],
        "search": ["search", *search],
        "run": ["run", *search, "--tasks", "", "--max-eval-windows", "1", "--full-seq-len", "8"],
        "finetune": ["finetune", "--model", str(model), "--steps", "1", "--out", str(out)],
        "export": ["export", str(model), "--gguf", str(out / "m.gguf")],
    }


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "model"
    tiny_llama(6, 2).save_pretrained(path)
    word_level_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_every_command_refuses_a_damaged_model_in_one_line(corruption, saved_model, tmp_path, capsys):
    corrupt, words = CORRUPTIONS[corruption]
    model = tmp_path / "model"
    model.mkdir()
    for file in saved_model.iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    corrupt(model)
    write_pool(tmp_path / "pool.txt", seed=1)
    for command, argv in commands(model, tmp_path / "pool.txt", tmp_path / "out").items():
        code, _, err = run_cli(capsys, *argv)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, (command, err[-500:])
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, (command, err[-500:])
        assert not (tmp_path / "out").exists(), command


def test_the_clean_model_passes_every_check(saved_model, tmp_path, capsys):
    """The same commands on the undamaged copy get past loading (the table's errors come from the damage)."""
    code, out, err = run_cli(capsys, *commands(saved_model, tmp_path / "pool.txt", tmp_path / "out")["eval"])
    assert code == 0 and "error:" not in err and "ppl" in out, err[-500:]
