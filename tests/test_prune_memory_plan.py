"""`prune --memory-plan`: the statistics it plans are the bytes `prune_model` holds; nothing is loaded or written."""

import torch

from adapruner.choosing.selection import plan_allocation
from adapruner.cli import main
from adapruner.cutting.compensation import refit_updates
from adapruner.cutting.pruning import PruneOptions
from adapruner.cutting.working_set import activation_bytes, prune_memory_plan, weight_count
from adapruner.model.structure import output_projections
from adapruner.recipes import recipe_prune_options
from adapruner.scoring.sources import CalibrationPasses
from tests.helpers import save_tiny_model
from tests.models import tiny_llama


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def test_planned_statistics_are_what_the_passes_hold():
    """The best recipe's refit phase: every output projection's μ and mean x² (8·in) and Gram (4·in²) — exactly what
    `CalibrationPasses` keeps after `importance` — and refit weights of at most 4·out·in each."""
    model = tiny_llama(n_kv=2)
    options = recipe_prune_options("best", target_params=0.2)
    options = PruneOptions(options.spec, calib="wiki:4", seq_len=16)
    plan = prune_memory_plan(model, options, "cpu", 0)
    phases = {phase.name: phase.bytes for phase in plan.phases}
    assert list(phases) == ["load", "statistics", "allocation", "refit", "cut"]
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    passes = CalibrationPasses(ids, progress=False, keep_gram=True)
    importance = passes.importance(model, options.spec)
    held = nbytes(t for m in passes._moments.values() for t in (m.mean, m.square_mean, m.gram))
    held += nbytes(passes._covariances.values())
    outputs = output_projections(model, range(len(model.model.layers)))
    assert phases["refit"] - 4 * weight_count(outputs) == held
    updates = refit_updates(model, plan_allocation(model, importance, options.spec), passes, "lsq", 0.3)
    assert 0 < nbytes(weight for weight, _bias in updates.values()) <= 4 * weight_count(outputs)
    assert plan.model_bytes == nbytes(model.parameters())
    assert plan.peak_bytes == plan.model_bytes + max(phases.values())


def test_activation_bytes_by_hand():
    """tiny_llama: hidden 48, 4 query heads of 8 (q = 32), 2 kv heads (k = 16), 24 MLP channels, 3 layers,
    vocabulary 97; a batch of 8 windows of 16 tokens (T = 128) in fp32."""
    model = tiny_llama(n_kv=2)
    hidden, query, kv, width, heads, layers, vocab, tokens = 48, 32, 16, 24, 4, 3, 97, 128
    forward = tokens * (2 * hidden + query + 2 * kv + 3 * width) * 4 + 8 * tokens * vocab
    saved = tokens * (4 * hidden + 3 * query + 3 * kv + 5 * width + 2 * heads * 16) * 4  # one layer's, for autograd
    whole = layers * saved + 12 * tokens * vocab
    layered = layers * tokens * hidden * 4 + saved + 12 * tokens * vocab  # every layer's input, one layer's tensors
    assert activation_bytes(model, 8, 16, 4, backward=None) == forward
    assert activation_bytes(model, 8, 16, 4, backward="whole") == whole
    assert activation_bytes(model, 8, 16, 4, backward="layered") == layered


def test_prune_memory_plan_prints_and_writes_nothing(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    out = tmp_path / "pruned"
    code = main(
        ["prune", "--model", str(tmp_path / "model"), "--target-params", "0.2", "--seq-len", "32", "--memory-plan"]
        + ["--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    for row in ("model weights", "load", "statistics", "allocation", "refit", "cut", "peak"):
        assert row in printed
    weights = sum(f.stat().st_size for f in (tmp_path / "model").glob("*.safetensors"))
    assert f"{weights / 2**30:.3f} GiB" in printed  # the load phase maps the weights file
