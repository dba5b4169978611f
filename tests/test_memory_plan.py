"""`search --memory-plan`: the cache size derived from shapes alone is what a built cache holds; nothing is written."""

import torch

from adapruner.choosing.spec import PruneSpec
from adapruner.cli import main
from adapruner.commands.search import memory_plan_of
from adapruner.model.models import load_shapes
from adapruner.scoring.cache import CandidatePool, build_cache, cache_key, candidate_pool, planned_bytes
from adapruner.searching.memory_plan import GIB
from adapruner.searching.search_options import SearchOptions
from tests.helpers import save_tiny_model


def test_planned_cache_bytes_are_the_built_cache_s(smollm2, tmp_path):
    model, tokenizer = smollm2
    layers = range(4, 28)
    for activations, dtype in ((True, "bfloat16"), (False, "float32")):
        shapes = load_shapes("smollm2")
        planned = planned_bytes(
            shapes,
            cache_key(
                "smollm2",
                shapes,
                CandidatePool(["wiki", "news"], 2, 32, 0),
                layers,
                activations=activations,
                dtype=dtype,
            ),
        )
        key = cache_key(
            "smollm2", model, CandidatePool(["wiki", "news"], 2, 32, 0), layers, activations=activations, dtype=dtype
        )
        ids, addresses = candidate_pool(tokenizer, ["wiki", "news"], 2, 32, 0)
        cache = build_cache(model, key, ids, addresses, progress=False)
        cache.save(tmp_path / "c.safetensors")
        assert planned == cache.nbytes  # exact: the plan lists the tensors build_cache stores
        assert abs((tmp_path / "c.safetensors").stat().st_size - planned) <= 0.05 * planned  # the file adds its header


def test_search_plan_prints_and_writes_nothing(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    out = tmp_path / "s"
    code = main(
        [
            "search",
            "--model",
            str(tmp_path / "model"),
            "--layers",
            "all",
            "--pools",
            "wiki",
            "--pool-size",
            "3",
            "--seq-len",
            "16",
            "--metrics",
            "taylor1",
            "--cache-dtype",
            "float32",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--refit-calib",
            "wiki:4",
            "--memory-plan",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "activation cache" in printed and not out.exists() and not (tmp_path / "cache").exists()
    assert "refit pool" in printed
    plan = memory_plan_of(
        SearchOptions(
            model=str(tmp_path / "model"),
            spec=PruneSpec(layers="all"),
            pools=["wiki"],
            pool_size=3,
            seq_len=16,
            metrics=("taylor1",),
            cache_dtype="float32",
            cache_dir=str(tmp_path / "cache"),
            device="cpu",
            dtype="float32",
        )
    )
    # per layer, n = 3 windows, T = 48 tokens, fp32: 4 statistics of n rows per linear (2 of out, 2 of in columns),
    # act and xsum of n rows per distinct input (q, o, gate, down), dY of T rows per linear,
    # X of T rows per distinct input
    outs = {
        "q": 32,
        "k": 32,
        "v": 32,
        "o": 48,
        "gate": 24,
        "up": 24,
        "down": 48,
    }  # 4 heads × head_dim 8; hidden 48; 24 channels
    ins = {"q": 48, "k": 48, "v": 48, "o": 32, "gate": 48, "up": 48, "down": 24}
    owners = sum(ins[p] for p in ("q", "o", "gate", "down"))
    n, tokens = 3, 48
    per_layer = (
        2 * n * (sum(outs.values()) + sum(ins.values())) + 2 * n * owners + tokens * (sum(outs.values()) + owners)
    )
    assert plan.cache_bytes == 3 * per_layer * 4  # 275,328 bytes
    assert f"{plan.cache_bytes / GIB:.3f} GiB" in printed and torch.device(plan.device).type == "cpu"


def test_the_cache_goes_to_the_first_tier_that_holds_it():
    """device (under --cache-mem and beside the model) → pinned host memory (CUDA, at most half the host's
    available memory) → memory-mapped; a spread model's cache never goes on the device."""
    from adapruner.searching.memory_plan import cache_placement

    gib = 2**30
    assert cache_placement("cuda", 14 * gib, 8 * gib, 16 * gib, 80 * gib, 200 * gib) == "device"
    assert cache_placement("cuda", 14 * gib, 34 * gib, 16 * gib, 80 * gib, 200 * gib) == "pinned"  # over --cache-mem
    assert cache_placement("cuda", 70 * gib, 8 * gib, 16 * gib, 75 * gib, 200 * gib) == "pinned"  # not beside the model
    assert cache_placement("cuda", 14 * gib, 8 * gib, 16 * gib, 80 * gib, 200 * gib, spread=True) == "pinned"
    assert cache_placement("cuda", 14 * gib, 120 * gib, 16 * gib, 80 * gib, 200 * gib) == "mapped"  # over half the host
    assert (
        cache_placement("cpu", 1 * gib, 30 * gib, 16 * gib, 200 * gib, 200 * gib) == "mapped"
    )  # no pinning without CUDA
    assert cache_placement("cpu", 1 * gib, 2 * gib, 16 * gib, 200 * gib, 200 * gib) == "device"


def test_a_spread_model_s_bytes_leave_less_host_memory_to_pin():
    from adapruner.searching.memory_plan import cache_placement

    gib = 2**30
    assert (
        cache_placement("cuda", 150 * gib, 30 * gib, 16 * gib, 80 * gib, 200 * gib, spread=True) == "mapped"
    )  # 2 · 30 > 200 − 150
    assert (
        cache_placement("cuda", 150 * gib, 30 * gib, 16 * gib, 80 * gib, 200 * gib) == "pinned"
    )  # a model on its GPU takes no host memory


def test_planned_refit_pool_bytes_are_the_collected_pool_s(tmp_path):
    from adapruner.scoring.refit_pool import collect_refit_pool, refit_pool_bytes
    from tests.helpers import byte_level_tokenizer, tiny_family, write_pool

    write_pool(tmp_path / "a.txt", seed=1)
    model = tiny_family("qwen3")
    for fisher in (False, True):
        windows = (f"{tmp_path / 'a.txt'}:4", 16, 0)
        pool = collect_refit_pool(model, byte_level_tokenizer(), windows, range(1, 4), False, fisher, fisher)
        tensors = [t for m in pool.moments.values() for t in (m.mean, m.square_mean, m.gram) if t is not None]
        held = sum(t.numel() * t.element_size() for t in [*tensors, *pool.fisher.values()])
        assert refit_pool_bytes(model, range(1, 4), fisher) == held
        assert pool.to("cpu").moments.keys() == pool.moments.keys()


def test_the_refit_pool_stays_on_the_device_only_beside_room_for_the_trials():
    """An 8B shape's pool (≈ 26 GiB fp32) stays beside its bf16 weights on an 80 GB device; a 70B shape's (≈ 266 GiB)
    goes to host memory, one Gram on the device at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapruner.scoring.refit_pool import refit_pool_bytes
    from adapruner.searching.memory_plan import refit_placement

    def shape(hidden, intermediate, layers, heads):
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=8,
            vocab_size=128256,
        )
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        weights = sum(p.numel() for p in model.parameters()) * 2  # bf16
        return weights, refit_pool_bytes(model, range(layers), fisher=True)

    device = 80 * 10**9
    weights, pool = shape(4096, 14336, 32, 32)
    assert 25 * GIB < pool < 27 * GIB and refit_placement(weights, pool, device) == "device"
    assert refit_placement(weights, pool, device, device_map="auto") == "host"
    weights, pool = shape(8192, 28672, 80, 64)
    assert 260 * GIB < pool < 270 * GIB and refit_placement(weights, pool, device) == "host"


def test_a_widths_search_plans_its_layer_variants_in_host_memory(tmp_path, capsys):
    """`--structure widths` plans no activation cache and a layer-variant store of at least two structures' worth
    (every output projection's fp32 refit at its dense width, with its bias), the bound its search is given."""
    from adapruner.searching.memory_plan import variant_store_bytes
    from adapruner.searching.widths import structure_bytes

    save_tiny_model(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--structure", "widths", "--target-params", "0.2"]
    code = main(
        ["search", *common, "--refit-calib", "wiki:4", "--seq-len", "16", "--memory-plan"]
        + ["--out", str(tmp_path / "s")]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "layer variants" in printed and not (tmp_path / "s").exists()
    shapes = load_shapes(str(tmp_path / "model"))
    one = structure_bytes(shapes, range(len(shapes.model.layers)))
    hidden, heads, width, layers = 48, 32, 24, len(shapes.model.layers)  # o_proj 32 → 48, down_proj 24 → 48
    assert one == layers * 4 * ((heads + 1) * hidden + (width + 1) * hidden)
    options = SearchOptions(
        model=str(tmp_path / "model"),
        spec=PruneSpec(target_params=0.2, layers="all"),
        structure="widths",
        refit_calib="wiki:4",
        seq_len=16,
        device="cpu",
        dtype="float32",
    )
    plan = memory_plan_of(options)
    assert plan.cache_bytes == 0 and plan.variants_bytes == variant_store_bytes(one, plan.host_available_bytes)
    assert plan.variants_bytes >= 2 * one
