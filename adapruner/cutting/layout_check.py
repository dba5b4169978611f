"""The self-check of a family on the user's own model, before any work (`check_layout`).

On copies of the first decoder layer, run on its real inputs (a forward of 2 random windows of 8 tokens, stopped as
the layer is entered):
  MLP      a dense MLP computes what the family says: down(act(gate x) ⊙ up x) — of the fused gate_up's halves, or
           down(act(up x)) without a gate — on random inputs, against the module's own forward;
  a cut    removing one attention unit (kv group 0, or query head 0 with a single kv head) and one MLP channel
           (channel 0 of every expert) gives the layer's contribution (its output less its input) of the copy whose
           removed units are zeroed (their output-projection columns); a family whose heads cannot be cut
           (`Family.attention_refusal`) or are renormalised once cut (`Family.head_norms`: not exact by design) is
           checked on its MLP alone. Relative max difference < 1e-4 in fp32, < 3e-2
           in half precision (sums run in another order once cut; a wrong layout differs by O(1)).
A layout that fails is one `AdaPrunerError` naming the part that did not match: never a silently wrong model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.activations import ACT2FN

from adapruner.choosing.plan import PrunePlan
from adapruner.cutting.removal import cut
from adapruner.errors import AdaPrunerError
from adapruner.model.big_model import is_dispatched
from adapruner.model.families import text_config
from adapruner.model.family import Family
from adapruner.model.structure import EXPERT_WEIGHTS, LayerInfo, decoder_layers, layer_info
from adapruner.scoring.collect import LayerRun, layer_inputs

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}  # relative; half precision: HALF_TOLERANCE
HALF_TOLERANCE = 3e-2  # bf16/fp16 layers sum in another order once cut; a wrong layout differs by O(1)


def check_family_layout(model: nn.Module) -> None:
    """`check_layout` on every model whose weights are in memory, declared family or derived (a model spread by
    --device-map is not checked: its offloaded layers hold no weights). It costs two copies of one layer and a
    forward of 16 tokens."""
    if not is_dispatched(model):
        check_layout(model)


@torch.no_grad()
def check_layout(model: nn.Module, seed: int = 0) -> None:
    """Raise a one-line error where the family's view of `model` does not match its forward (module docstring)."""
    info = layer_info(model, 0)
    family = info.family
    if info.experts is None and info.intermediate:
        _check_mlp_formula(model, info, seed)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))
    hidden, arguments = layer_inputs(model, ids, [0], batch_size=2)
    attention = family.attention_refusal is None and family.head_norms is None and info.n_heads > 1
    zeroed, plan = _zeroed_copy(model, info, attention), _plan(info, attention)
    expected = LayerRun(zeroed, hidden, arguments[0]).outputs()
    try:
        found = LayerRun(_cut_copy(model, plan), hidden, arguments[0]).outputs()
    except (RuntimeError, ValueError, IndexError) as exc:
        raise AdaPrunerError(
            f"{family.model_type}: the layer cut by its layout does not run ({str(exc).splitlines()[0][:100]}): "
            + _remedy(family)
        ) from None
    # the layer's own contribution (its output less the residual input), where a wrong cut shows in full
    difference = max(_relative(f - h, e - h) for f, e, h in zip(found, expected, hidden))
    if difference > _tolerance(model):
        part = "attention heads and MLP channels" if attention else "MLP channels"
        raise AdaPrunerError(
            f"{family.model_type}: removing {part} by its layout does not match zeroing them (relative "
            f"difference {difference:.1e}): {_remedy(family)}"
        )


def _check_mlp_formula(model: nn.Module, info: LayerInfo, seed: int) -> None:
    family, mlp = info.family, info.mlp
    weight = getattr(mlp, family.down).weight
    x = torch.randn(2, 4, weight.shape[0], generator=torch.Generator().manual_seed(seed)).to(weight)
    act = getattr(mlp, "act_fn", None) or ACT2FN[text_config(model.config).hidden_act]
    if family.gate_up:
        gate, up = getattr(mlp, family.gate_up)(x).chunk(2, dim=-1)
        inner = act(gate) * up
    elif family.gate:
        inner = act(getattr(mlp, family.gate)(x)) * getattr(mlp, family.up)(x)
    else:
        inner = act(getattr(mlp, family.up)(x))
    difference = _relative(getattr(mlp, family.down)(inner), mlp(x))
    if difference > _tolerance(model):
        formula = {True: "down(act(gate x)·up x)", False: "down(act(up x))"}[bool(family.gate or family.gate_up)]
        raise AdaPrunerError(
            f"{family.model_type}: its MLP does not compute {formula} from the projections its layout "
            "names "
            f"(relative difference {difference:.1e}): {_remedy(family)}"
        )


def _plan(info: LayerInfo, attention: bool) -> PrunePlan:
    """Layer 0 without kv group 0 (or query head 0) and without MLP channel 0 of every expert."""
    plan = PrunePlan()
    if attention:
        if info.n_kv_heads > 1:  # GQA/MHA: a whole kv group; MQA (one kv head): query head 0
            per = info.heads_per_kv
            plan.attention[0] = (list(range(per, info.n_heads)), list(range(1, info.n_kv_heads)))
        else:
            plan.attention[0] = (list(range(1, info.n_heads)), list(range(info.n_kv_heads)))
    if info.intermediate > 1:
        plan.mlp[0] = [u for u in range(info.mlp_units) if u % info.intermediate != 0]
    return plan


def _zeroed_copy(model: nn.Module, info: LayerInfo, attention: bool) -> nn.Module:
    """Layer 0 with the removed units' output-projection columns zeroed."""
    layer = copy.deepcopy(decoder_layers(model)[0])
    family = info.family
    if attention:
        heads = info.heads_per_kv if info.n_kv_heads > 1 else 1
        getattr(getattr(layer, family.attention), family.o).weight[:, : heads * info.head_dim] = 0
    mlp = getattr(layer, family.mlp)
    if info.intermediate <= 1:
        return layer
    if info.experts is None:
        getattr(mlp, family.down).weight[:, 0] = 0
    else:
        getattr(getattr(mlp, family.experts), EXPERT_WEIGHTS[1])[:, :, 0] = 0
    return layer


def _cut_copy(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A copy of layer 0 cut by `plan` (the model's own layer is swapped out meanwhile and put back)."""
    layers = decoder_layers(model)
    original = layers[0]
    layers[0] = copy.deepcopy(original)
    try:
        cut(model, plan)
        return layers[0]
    finally:
        layers[0] = original


def _remedy(family: Family) -> str:
    """What to do about a layout that failed its check: a derived one needs declaring; a declared one was modified."""
    if family.derived:
        return "this layout needs a declared family"
    return "the model does not match its declared family (a modified modeling file?); report it with the model"


def _tolerance(model: nn.Module) -> float:
    return TOLERANCE.get(next(model.parameters()).dtype, HALF_TOLERANCE)


def _relative(found: torch.Tensor, expected: torch.Tensor) -> float:
    return float((found.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))
