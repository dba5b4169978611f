"""Families without an entry in the table (issue 35): their layout is derived from their modules, checked on the model
before any work, and pruned like a declared family's — zeroed units are what `l2` removes, the pruned model (in
memory, reloaded with the shipped modeling file) computes the dense logits; what cannot be derived or pruned exactly
is refused in one line."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from adapruner.choosing.selection import plan_pruning
from adapruner.cutting.layout_check import check_layout
from adapruner.cutting.removal import apply_plan
from adapruner.errors import AdaPrunerError
from adapruner.model.derived import derive_family
from adapruner.model.families import FAMILIES, check_attention_pruning, family_of
from adapruner.model.models import load_model
from adapruner.model.structure import layer_info
from adapruner.output.saving import save_pruned
from adapruner.scoring.importance import Importance
from tests.helpers import DERIVED_KWARGS, DERIVED_MOE_KWARGS, TINY_BASE, masked_logits, tiny_family
from tests.models import word_level_tokenizer
from tests.test_families import (
    assert_l2_removes_zeroed_units,
    assert_same_logits,
    assert_spanning_norms_are_cut_with_the_heads,
    logits,
)

SPANNING_NORMS = {"olmo3", "olmoe"}  # q_norm/k_norm over all heads: heads pruned only with --inexact-heads


def test_the_derived_families_have_no_entry():
    assert not (set(DERIVED_KWARGS) | set(DERIVED_MOE_KWARGS)) & set(FAMILIES)


@pytest.mark.parametrize("model_type", [*DERIVED_KWARGS, *DERIVED_MOE_KWARGS])
def test_a_derived_family_passes_its_self_check(model_type):
    model = tiny_family(model_type)
    family = family_of(model.config)
    assert family.derived and family.model_class == type(model).__name__
    assert family.attention_refusal is None and (family.head_norms is not None) == (model_type in SPANNING_NORMS)
    check_layout(model)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_declared_family_is_derived_as_declared(model_type):
    """The derivation reads every declared family's layout as the table states it — fused projections, spanning
    norms, experts, Phi-3's head count read from the config (a per-layer view) — and each passes its self-check."""
    model = tiny_family(model_type)
    assert derive_family(model) == replace(FAMILIES[model_type], derived=True)
    check_layout(model)


def test_a_modified_declared_family_is_caught_by_its_self_check():
    model = tiny_family("llama")
    for layer in model.model.layers:  # a modeling file whose MLP reads up_proj as its gate
        mlp = layer.mlp
        mlp.forward = lambda x, mlp=mlp: mlp.down_proj(mlp.act_fn(mlp.up_proj(x)) * mlp.gate_proj(x))
    with pytest.raises(AdaPrunerError, match="llama: its MLP does not compute .* does not match its declared family"):
        check_layout(model)


@pytest.mark.parametrize("model_type", DERIVED_KWARGS)
def test_zeroed_units_are_what_l2_removes_and_the_pruned_model_reloads(model_type, tmp_path):
    assert_l2_removes_zeroed_units(tiny_family(model_type), model_type not in SPANNING_NORMS, tmp_path)


@pytest.mark.parametrize("model_type", [*DERIVED_KWARGS, *DERIVED_MOE_KWARGS])
def test_a_derived_pruned_model_is_the_dense_one_masked(model_type, tmp_path):
    """MoE families too (every expert's channels): in memory and reloaded with the shipped modeling file."""
    model = tiny_family(model_type, seed=1)
    attention = model_type not in SPANNING_NORMS
    plan = plan_pruning(model, Importance("l2"), 0.5, range(0, 4), "kv", prune_attention=attention)
    expected = masked_logits(model, plan, torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3)))
    apply_plan(model, plan)
    assert_same_logits(logits(model), expected)
    if attention:
        assert [(layer_info(model, i).n_heads, layer_info(model, i).n_kv_heads) for i in range(4)] == [(2, 1)] * 4
    save_pruned(model, word_level_tokenizer(), tmp_path / "pruned")
    reloaded, _ = load_model(str(tmp_path / "pruned"))
    assert_same_logits(logits(reloaded), expected)


@pytest.mark.parametrize("model_type", ["olmo2", "olmo3", "olmoe"])
def test_norms_spanning_the_heads_prune_heads_only_when_asked(model_type):
    """Declared (OLMo-2) and derived alike: refused with both ways out named, allowed with --inexact-heads."""
    config = tiny_family(model_type).config
    with pytest.raises(AdaPrunerError, match="span all heads.*--no-attention.*--inexact-heads"):
        check_attention_pruning(config, prune_attention=True)
    check_attention_pruning(config, prune_attention=False)
    check_attention_pruning(config, prune_attention=True, inexact_heads=True)


@pytest.mark.parametrize("model_type", sorted(SPANNING_NORMS))
def test_derived_spanning_norms_are_cut_with_the_heads(model_type, tmp_path):
    assert_spanning_norms_are_cut_with_the_heads(tiny_family(model_type), tmp_path)


def test_a_family_with_spanning_norms_is_refused_heads_at_the_command_line(tmp_path, capsys):
    """Before any weight is read: one line, exit 2, nothing written."""
    from adapruner.cli import main

    tiny_family("olmo2").save_pretrained(tmp_path / "model")
    word_level_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tmp_path / "model"), "--seq-len", "16", "--out", str(out), "--no-eval"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert error[-1].startswith("error: olmo2's q_norm and k_norm span all heads") and "--inexact-heads" in error[-1]


def test_per_head_norm_lists_refuse_attention_pruning():
    config = AutoConfig.for_model("stablelm", **TINY_BASE, qk_layernorm=True)
    with pytest.raises(AdaPrunerError, match="one q_layernorm per head.*--no-attention"):
        check_attention_pruning(config, prune_attention=True)


@pytest.mark.parametrize(
    ("model_type", "extra", "reason"),
    [
        ("deepseek_v3", {"q_lora_rank": 16, "kv_lora_rank": 8}, "multi-latent attention"),
        ("jamba", {}, "hybrid state-space"),
        ("gpt2", {}, "no per-head q/k/v/o projections"),
        ("gpt_oss", {}, r"experts are stored as gate_up \(128, 2880, 5760\).*with biases"),
        ("llama4_text", {"num_hidden_layers": 2}, r"experts are stored as .*not \[E, 2I, H\]"),
        ("glm4_moe", {"num_hidden_layers": 2, "first_k_dense_replace": 1}, "layer 1 is built unlike layer 0"),
    ],
)
def test_layouts_that_cannot_be_pruned_are_refused_with_the_reason(model_type, extra, reason):
    config = AutoConfig.for_model(model_type, **extra)
    with pytest.raises(AdaPrunerError, match=reason):
        family_of(config)


def test_a_wrong_derived_layout_is_caught_before_any_work(tmp_path, capsys):
    """A model whose MLP forward reads up_proj as its gate (and gate_proj as its up) derives the usual layout; the
    self-check finds that the MLP does not compute down(act(gate x)·up x): one line, exit 2, nothing written."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    from adapruner.cli import main

    class SwappedConfig(LlamaConfig):
        model_type = "swapped_llama"

    class SwappedMLP(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    class SwappedForCausalLM(LlamaForCausalLM):
        config_class = SwappedConfig

        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                layer.mlp = SwappedMLP(config)

    AutoConfig.register("swapped_llama", SwappedConfig, exist_ok=True)
    AutoModelForCausalLM.register(SwappedConfig, SwappedForCausalLM, exist_ok=True)
    torch.manual_seed(0)
    SwappedForCausalLM(SwappedConfig(**TINY_BASE)).save_pretrained(tmp_path / "model")
    word_level_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tmp_path / "model"), "--seq-len", "16", "--out", str(out), "--no-eval"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert error[-1].startswith("error: swapped_llama: its MLP does not compute down(act(gate x)·up x)")


STOCK_REFUSED = {"helium", "stablelm"}  # their stock classes size o_proj (StableLM: q too) by hidden_size


@pytest.mark.parametrize("model_type", [*DERIVED_KWARGS, *DERIVED_MOE_KWARGS])
def test_a_stock_config_save_loads_with_the_stock_class_or_is_refused(model_type, tmp_path):
    model = tiny_family(model_type, seed=2)
    for linear in model.modules():  # a stock config has no output biases for a refit: keep the families' own
        if isinstance(linear, torch.nn.Linear) and linear.bias is not None:
            linear.bias = None
    plan = plan_pruning(
        model, Importance("l2"), 0.5, range(0, 4), "kv", prune_attention=model_type not in SPANNING_NORMS
    )
    apply_plan(model, plan)
    pruned = logits(model)
    if model_type in STOCK_REFUSED:
        with pytest.raises(AdaPrunerError, match="--stock-config: .* stock class builds .*_proj.weight"):
            save_pruned(model, word_level_tokenizer(), tmp_path / "uniform", stock_config=True)
        assert not (tmp_path / "uniform").exists()
        return
    save_pruned(model, word_level_tokenizer(), tmp_path / "uniform", stock_config=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()  # no remote code
    assert type(reloaded).__name__ == type(model).__name__
    assert_same_logits(logits(reloaded), pruned)


@pytest.mark.parametrize("model_type", ["ministral", "glm", "arcee", "cohere2"])
def test_a_search_runs_on_a_derived_family(model_type, tmp_path):
    """Fused gate_up (glm), an MLP without a gate (arcee: its up_proj reads its own input in the cache), a parallel
    block (cohere2): cache, trials and the delivered plan, end to end."""
    from adapruner.cutting.pruning import apply_study_plan
    from tests.helpers import tiny_search

    best = tiny_search(tmp_path, tiny_family(model_type), compensations=("none", "lsq"))
    assert 0 < best.removed_fraction < 1
    dense, tokenizer = load_model(str(tmp_path / "model"))
    assert apply_study_plan(dense, best, tokenizer, progress=False).plan == best.prune_plan
