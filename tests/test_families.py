"""Every supported dense family on a tiny random model: zeroed units are the ones an l2 prune removes and the pruned
model (in memory, reloaded with its modeling file, or saved `--stock-config` and loaded with the stock class) computes
the dense model's logits; with random weights it computes the logits of the dense model with the removed units
masked; a search runs on it end to end."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapruner.choosing.selection import plan_from_counts, plan_pruning, score_layers
from adapruner.choosing.spec import PruneSpec
from adapruner.cutting.pruning import apply_study_plan
from adapruner.cutting.removal import apply_plan
from adapruner.model.families import FAMILIES, family_of
from adapruner.model.models import load_model
from adapruner.model.structure import attention_group, decoder_layers, layer_info, mlp_group
from adapruner.output.saving import save_pruned
from adapruner.scoring.importance import Importance
from tests.helpers import FAMILY_TYPES, MOE_TYPES, masked_logits, tiny_family, tiny_search
from tests.models import word_level_tokenizer

TOKENS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
NORM_SPANS_HEADS = {t for t, f in FAMILIES.items() if f.head_norms}  # removing a head renormalises the kept ones


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    relative = (got - expected).abs().max() / expected.abs().max()
    assert relative < 1e-4, float(relative)


def zero_units(model, layer: int, kv_groups: list[int], channels: list[int]) -> None:
    """Zero every weight (and bias) entry of the given kv groups and MLP channels, through the family's layout."""
    info = layer_info(model, layer)
    with torch.no_grad():
        for group, units in ((attention_group(info, "kv"), kv_groups), (mlp_group(info), channels)):
            for member in group.members:
                for unit in units:
                    start = member.offset + unit * member.block
                    member.linear.weight.narrow(member.dim, start, member.block).zero_()
                    if member.dim == 0 and member.linear.bias is not None:
                        member.linear.bias[start : start + member.block] = 0


def test_the_family_layer_covers_the_test_zoo():
    assert set(FAMILY_TYPES) | set(MOE_TYPES) == set(FAMILIES)  # MoE families: tests/test_moe.py


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_zeroed_units_are_what_l2_removes_and_the_pruned_model_is_the_dense_one(model_type, tmp_path):
    assert_l2_removes_zeroed_units(tiny_family(model_type), model_type not in NORM_SPANS_HEADS, tmp_path)


def assert_l2_removes_zeroed_units(model, exact_heads: bool, tmp_path) -> None:
    """Zero kv group 1 (where heads cut exactly) and MLP channels 2, 5, 11 of layer 1: an l2 plan removes exactly
    those, and the pruned model — in memory, reloaded with its modeling file (transformers' and adapruner's copy) —
    computes the dense logits."""
    zero_units(model, 1, kv_groups=[1] if exact_heads else [], channels=[2, 5, 11])
    dense = logits(model)
    scores = score_layers(model, Importance("l2"), {1: (exact_heads, True)}, "kv")
    plan = plan_from_counts(model, scores, {1: (int(exact_heads), 3)}, "kv")
    if exact_heads:
        assert plan.attention[1] == ([0, 1], [0])  # kv group 1 serves query heads 2 and 3
    assert plan.mlp[1] == [c for c in range(24) if c not in (2, 5, 11)]
    apply_plan(model, plan)
    assert_same_logits(logits(model), dense)
    save_pruned(model, word_level_tokenizer(), tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    assert type(reloaded).__name__ == f"Pruned{family_of(model.config).model_class}"
    assert_same_logits(logits(reloaded), dense)
    ours, _ = load_model(str(tmp_path / "pruned"))  # adapruner's own copy of the modeling file
    assert_same_logits(logits(ours), dense)


@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_pruned_model_equals_the_dense_model_with_the_units_masked(model_type, granularity):
    model = tiny_family(model_type, seed=1)
    attention = model_type not in NORM_SPANS_HEADS
    plan = plan_pruning(model, Importance("l2"), 0.5, range(0, 4), granularity, prune_attention=attention)
    expected = masked_logits(model, plan, TOKENS)
    apply_plan(model, plan)
    assert_same_logits(logits(model), expected)
    sizes = [(layer_info(model, i).n_heads, layer_info(model, i).n_kv_heads) for i in range(4)]
    if attention:
        assert sizes == [(2, 1)] * 4 if granularity == "kv" else [(2, 2)] * 4


@pytest.mark.parametrize("model_type", sorted(NORM_SPANS_HEADS))
def test_norms_spanning_the_heads_are_cut_with_them(model_type, tmp_path):
    assert_spanning_norms_are_cut_with_the_heads(tiny_family(model_type), tmp_path)


def assert_spanning_norms_are_cut_with_the_heads(model, tmp_path) -> None:
    """Pruning heads (--inexact-heads) keeps the kept heads' q_norm/k_norm entries, and the saved model reloads with
    the pruned model's logits."""
    attn = layer_info(model, 1).attn
    q_norm, k_norm = attn.q_norm.weight.detach().clone(), attn.k_norm.weight.detach().clone()
    plan = plan_pruning(model, Importance("l2"), 0.5, range(1, 2), "kv")
    (keep_q, keep_kv), hd = plan.attention[1], 8
    apply_plan(model, plan)
    rows = lambda heads: torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])  # noqa: E731
    attn = layer_info(model, 1).attn
    assert torch.equal(attn.q_norm.weight, q_norm[rows(keep_q)]) and torch.equal(
        attn.k_norm.weight, k_norm[rows(keep_kv)]
    )
    pruned = logits(model)
    save_pruned(model, word_level_tokenizer(), tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    assert_same_logits(logits(reloaded), pruned)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_a_uniform_save_loads_with_the_stock_class(model_type, tmp_path):
    model = tiny_family(model_type, seed=2)
    plan = plan_pruning(model, Importance("l2"), 0.5, range(0, 4), "kv")
    apply_plan(model, plan)
    pruned = logits(model)
    save_pruned(model, word_level_tokenizer(), tmp_path / "uniform", stock_config=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()  # no remote code
    assert type(reloaded).__name__ == family_of(model.config).model_class
    assert_same_logits(logits(reloaded), pruned)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_a_search_runs_on_every_family(model_type, tmp_path):
    spec = PruneSpec(0.5, layers="all", inexact_heads=model_type in NORM_SPANS_HEADS)  # OLMo-2's heads: when asked
    best = tiny_search(tmp_path, tiny_family(model_type), spec=spec, compensations=("none", "lsq"))
    assert (tmp_path / "s" / "best.json").is_file() and 0 < best.removed_fraction < 1
    dense, tokenizer = load_model(str(tmp_path / "model"))
    result = apply_study_plan(dense, best, tokenizer, progress=False)
    assert result.plan == best.prune_plan
    assert [layer_info(dense, i).intermediate for i in range(len(decoder_layers(dense)))] == [12] * 4


@pytest.mark.parametrize("model_type", [*FAMILY_TYPES, *MOE_TYPES])
def test_a_trial_scores_what_a_full_forward_of_the_model_gives(model_type):
    """The validation scorer's prefix (layers before the first pruned one, run once) joins the rest of every family
    exactly: an unpruned trial's perplexity is the full model's (Granite scales its input embeddings in the model's
    forward: the prefix must not be scaled twice)."""
    from adapruner.choosing.plan import PrunePlan
    from adapruner.evaluation.evaluate import perplexity
    from adapruner.searching.trial_scorer import ValidationScorer

    model = tiny_family(model_type, seed=5)
    windows = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(6))
    scorer = ValidationScorer(model, windows, start=2, batch_size=2)
    assert scorer.score(PrunePlan()) == pytest.approx(perplexity(model, windows, 2, progress=False), rel=1e-5)


def test_the_shipped_modeling_file_reads_the_family_table():
    """`remote_code/modeling_pruned.py` runs without adapruner, so it keeps its own copy of the family table: the
    same families, each with the same classes, layer path, fused projections, sliced norms and config view."""
    import importlib.util

    from adapruner.model.families import FAMILIES, REMOTE_CODE

    loader = importlib.util.spec_from_file_location("shipped_modeling_pruned", REMOTE_CODE)
    shipped = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(shipped)
    ours = {
        name: (f.config_class, f.model_class, f.layers, f.qkv, f.gate_up, f.head_norms, f.layer_config)
        for name, f in FAMILIES.items()
    }
    assert shipped.FAMILIES == ours
