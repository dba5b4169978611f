"""The activation cache: any subset's importance equals a fresh forward+backward on that subset."""

import pytest
import torch

from adapruner.errors import AdaPrunerError
from adapruner.model.structure import attention_group, input_owner, layer_info, mlp_group, prunable_linears
from adapruner.scoring.cache import ActivationCache, CachedImportance, CandidatePool, build_cache, cache_key
from adapruner.scoring.collect import collect_stats
from adapruner.scoring.importance import Importance, needs

SEQ = 11
LAYERS = range(1, 3)


@pytest.fixture
def pool():
    return torch.randint(0, 97, (6, SEQ), generator=torch.Generator().manual_seed(3))


def make_cache(model, pool, dtype="float32"):
    key = cache_key("tiny", model, CandidatePool(["ids"], pool.shape[0], SEQ, 0), LAYERS, activations=True, dtype=dtype)
    return build_cache(model, key, pool, [("ids", i) for i in range(pool.shape[0])], batch_size=4, progress=False)


def groups(model):
    for index in LAYERS:
        info = layer_info(model, index)
        yield from (attention_group(info, "kv"), attention_group(info, "query"), mlp_group(info))


@pytest.mark.parametrize("metric", ["taylor1", "vector", "taylor2", "mix", "act"])
@pytest.mark.parametrize("subset", [[0], [1, 4], [0, 2, 3, 5]])
def test_cached_importance_equals_fresh_gradients(gqa_model, pool, metric, subset):
    """Tolerance: rtol 1e-4 (fp32 cache; sums taken in another order than autograd's)."""
    cache = make_cache(gqa_model, pool)
    samples = torch.tensor(subset)
    stats = collect_stats(gqa_model, prunable_linears(gqa_model, LAYERS), pool[samples], needs(metric), progress=False)
    fresh, cached = Importance(metric, "sum", stats), CachedImportance(cache, metric, "sum", samples)
    for group in groups(gqa_model):
        for member in group.members:
            expected = fresh.channel_scores(member)
            torch.testing.assert_close(
                cached.channel_scores(member), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
            )


def test_bf16_cache_stays_close(gqa_model, pool):
    """bf16 x/dy: taylor1 within 3% of the fp32 cache (the per-sample statistics stay fp32 either way)."""
    exact, rounded = make_cache(gqa_model, pool), make_cache(gqa_model, pool, "bfloat16")
    assert rounded.tensors["x/model.layers.1.self_attn.q_proj"].dtype == torch.bfloat16
    samples = torch.tensor([0, 3, 5])
    for group in groups(gqa_model):
        a, b = (
            CachedImportance(exact, "taylor1", "sum", samples)(group),
            CachedImportance(rounded, "taylor1", "sum", samples)(group),
        )
        torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2 * a.abs().max().item())


def test_shared_inputs_are_stored_once(gqa_model, pool):
    cache = make_cache(gqa_model, pool)
    assert input_owner("model.layers.1.self_attn.v_proj") == "model.layers.1.self_attn.q_proj"
    assert "x/model.layers.1.self_attn.k_proj" not in cache.tensors
    assert cache.tensors["x/model.layers.1.mlp.gate_proj"].shape == (6 * SEQ, 48)
    assert cache.tensors["dy/model.layers.2.mlp.down_proj"].shape == (6 * SEQ, 48)
    assert cache.tensors["fisher_rows/model.layers.2.mlp.up_proj"].shape == (6, 24)


def test_save_load_round_trip(gqa_model, pool, tmp_path):
    cache = make_cache(gqa_model, pool)
    cache.save(tmp_path / "c.safetensors")
    for limit in (0, 2**30):  # memory-mapped, then read into memory
        loaded = ActivationCache.load(tmp_path / "c.safetensors", limit)
        assert loaded.key == cache.key and loaded.addresses == cache.addresses
        assert all(torch.equal(loaded.tensors[k], v) for k, v in cache.tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_empty_subset_is_refused(gqa_model, pool):
    cache = make_cache(gqa_model, pool)
    member = mlp_group(layer_info(gqa_model, 1)).members[0]
    with pytest.raises(AdaPrunerError, match="subset is empty"):
        CachedImportance(cache, "vector", "sum", torch.tensor([], dtype=torch.long)).channel_scores(member)


def test_cached_vector_importance_of_linears_with_biases(pool):
    """Qwen2's q/k/v carry biases (random here): the cache takes X·Wᵀ from the forward's output less the bias
    (vec_rows), and the vector scores still equal fresh gradients'."""
    from tests.helpers import tiny_family

    qwen2_model = tiny_family("qwen2")
    cache = make_cache(qwen2_model, pool)
    samples = torch.tensor([1, 4])
    linears = prunable_linears(qwen2_model, LAYERS)
    stats = collect_stats(qwen2_model, linears, pool[samples], needs("vector"), progress=False)
    fresh, cached = Importance("vector", "sum", stats), CachedImportance(cache, "vector", "sum", samples)
    checked = 0
    for group in groups(qwen2_model):
        for member in group.members:
            expected = fresh.channel_scores(member)
            torch.testing.assert_close(
                cached.channel_scores(member), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
            )
            checked += member.dim == 0 and member.linear.bias is not None
    assert checked > 0
