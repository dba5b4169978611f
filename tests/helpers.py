"""Helpers shared by the test modules: tiny saved models and pools, CLI runs, the masked-dense reference."""

import copy

import torch

from adapruner.cli import main
from adapruner.structure import layer_info
from tests.conftest import tiny_llama, word_level_tokenizer


def save_tiny_model(path, seed=0):
    tiny_llama(seed=seed).save_pretrained(path)
    word_level_tokenizer().save_pretrained(path)


def write_pool(path, seed):
    words = torch.randint(1, 97, (900,), generator=torch.Generator().manual_seed(seed))
    path.write_text(" ".join(f"t{int(w)}" for w in words) + "\n")


def search_args(tmp_path, out, *extra):
    return [
        "search",
        "--model",
        str(tmp_path / "model"),
        "--pools",
        str(tmp_path / "a.txt"),
        "--pool-size",
        "4",
        "--seq-len",
        "16",
        "--layers",
        "all",
        "--metrics",
        "l2,vector,taylor1",
        "--sample-counts",
        "1,2",
        "--blocks-per-pool",
        "2",
        "--val-windows",
        "2",
        "--trials",
        "2",
        "--batch-size",
        "2",
        "--cache-dtype",
        "float32",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        *extra,
    ]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, message: str) -> bool:
    return err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err


def masked_logits(model, plan, tokens):
    """Logits of the dense model with every removed head's o_proj columns and MLP channel's down_proj column zeroed."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for index, (keep_q, _keep_kv) in plan.attention.items():
            info = layer_info(masked, index)
            for q in set(range(info.n_heads)) - set(keep_q):
                info.attn.o_proj.weight[:, q * info.head_dim : (q + 1) * info.head_dim] = 0
        for index, keep in plan.mlp.items():
            info = layer_info(masked, index)
            for channel in set(range(info.intermediate)) - set(keep):
                info.mlp.down_proj.weight[:, channel] = 0
        return masked(input_ids=tokens).logits
