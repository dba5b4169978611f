"""LoRA recovery: training lowers the loss, merging equals the adapter, Alpaca masking, clear errors."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapruner.data.finetune_data import IGNORE, collate, load_train_examples
from adapruner.errors import AdaPrunerError
from adapruner.evaluation.finetune import LoraOptions, finetune, merged
from adapruner.output.saving import save_adapter, save_pruned


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(" ".join(f"t{i % 7 + 3}" for i in range(400)))  # a short repeating pattern: learnable
    return path


def test_lora_lowers_loss_and_merge_matches_adapter(mha_model, tokenizer, text_file, token_batch, tmp_path):
    options = LoraOptions(r=4, alpha=8, dropout=0.0, lr=1e-2, cutoff=16, batch_size=4, max_steps=30, eval_every=10)
    result = finetune(mha_model, tokenizer, str(text_file), options, val_windows=token_batch, progress=False)
    assert sum(result.losses[-5:]) / 5 < 0.9 * sum(result.losses[:5]) / 5
    assert [step for step, _ in result.val_ppl] == [10, 20, 30] and "step budget" in result.stopped
    with torch.no_grad():
        adapted = result.model(input_ids=token_batch).logits
    save_adapter(result.model, tokenizer, tmp_path / "adapter")
    plain = merged(result)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=token_batch).logits, adapted, rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    out = save_pruned(plain, tokenizer, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    base = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=token_batch).logits, adapted, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert isinstance(PeftModel.from_pretrained(base, tmp_path / "adapter"), PeftModel)


def test_non_finite_loss_stops_with_a_clear_error(mha_model, tokenizer, text_file):
    options = LoraOptions(lr=1e30, cutoff=16, max_steps=20, dropout=0.0)
    with pytest.raises(AdaPrunerError, match="lower --lr"):
        finetune(mha_model, tokenizer, str(text_file), options, progress=False)


def test_alpaca_loss_is_on_the_response_only(tokenizer, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "t5 t6", "input": "", "output": "t7 t8 t9"}]))
    tokenizer.eos_token = "t1"
    examples = load_train_examples(tokenizer, str(data), cutoff=512)
    labels = examples.labels[0]
    assert (labels != IGNORE).sum().item() == 3 + 1  # three response tokens and the eos
    assert labels[-1].item() == tokenizer.eos_token_id
    with_prompt = load_train_examples(tokenizer, str(data), cutoff=512, train_on_prompt=True)
    assert (with_prompt.labels[0] != IGNORE).all()
    ids, mask, padded = collate(examples, [0, 0], pad_id=0)
    assert ids.shape == mask.shape == padded.shape and mask.all()


def test_malformed_data_names_the_line(tokenizer, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(AdaPrunerError, match=r"bad.jsonl:2: needs string fields 'instruction' and 'output'"):
        load_train_examples(tokenizer, str(data), cutoff=64)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(AdaPrunerError, match="broken.jsonl:2: not valid JSON"):
        load_train_examples(tokenizer, str(broken), cutoff=64)
