"""Output-preserving compensation after the input channels of o_proj / down_proj are removed.

For a linear y = W x + b whose input channels R are removed and K kept, with calibration inputs X (T × in),
mean μ = mean_t x_t, Gram C = XᵀX / T and covariance Σ = C − μμᵀ:
    bias  b' = b + W[:, R] μ_R                     the removed channels' mean contribution (exact in expectation)
    lsq   W'_K = (W Σ[:, K] + λ W[:, K]) (Σ[K, K] + λ I)⁻¹ = W[:, K] + W[:, R] Σ[R, K] (Σ[K, K] + λ I)⁻¹,
          λ = damp · mean diag Σ[K, K]
          b'   = b + W μ − W'_K μ_K
          the minimiser of mean_t ‖(W x_t + b) − (W'_K x_t,K + b')‖² + λ ‖W'_K − W[:, K]‖²: the kept columns
          reproduce the dense output as well as an affine map of x_K can, damped toward the trained weights
          (not toward zero, which measured worse on SmolLM2: docs/design.md, "Compensation"). damp → 0⁺ is ordinary
          least squares with an intercept.
Both read only μ (bias) or μ and C (lsq) of each o_proj / down_proj input, which are sums over samples: the search
forms them for any sample subset from the activation cache.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn

from adapruner.choosing.plan import PrunePlan
from adapruner.choosing.spec import DEFAULT_DAMP, check_compensation
from adapruner.devices import model_device
from adapruner.errors import AdaPrunerError
from adapruner.model.big_model import home_device, place_like, weights
from adapruner.model.structure import decoder_layers, head_channels, layer_info, linear_of, output_projections
from adapruner.scoring.importance import InputMoments
from adapruner.scoring.sources import StatisticsSource
from adapruner.searching.memory_plan import device_free_bytes

Update = tuple[torch.Tensor, torch.Tensor]  # (kept-column weight, bias) of one output linear


def compensated(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    moments: InputMoments,
    mode: str,
    damp: float = DEFAULT_DAMP,
) -> Update:
    """(W'_K, b') of the module docstring for the dense `weight` (out × in), `bias` and kept input columns `kept`."""
    check_compensation(mode)
    w = weight.detach().float()
    b = torch.zeros(w.shape[0], device=w.device) if bias is None else bias.detach().float()
    mu = moments.mean.to(w.device).float()
    kept = kept.to(w.device)
    if mode == "none":
        return w[:, kept], b
    removed = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    removed[kept] = False
    if mode == "bias":
        return w[:, kept], b + w[:, removed] @ mu[removed]
    if moments.gram is None:
        raise AdaPrunerError(
            "lsq compensation needs the inputs' Gram matrix: collect it with the calibration statistics"
        )
    if damp <= 0:
        raise AdaPrunerError(
            f"--damp {damp} must be positive (Σ_KK is singular with fewer tokens than kept channels): "
            f"pass e.g. {DEFAULT_DAMP}"
        )
    cov = moments.covariance.to(w.device).float()
    cov_kk = cov[kept][:, kept]
    lam = damp * cov_kk.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
    damped = cov_kk + lam * torch.eye(kept.numel(), device=w.device)  # A = Σ_KK + λI
    # (W Σ_:K + λ W_K) A⁻¹ = (W_K A + W_R Σ_RK) A⁻¹ = W_K + W_R Σ_RK A⁻¹: only the removed columns' product is formed
    moved = w[:, removed] @ cov[removed][:, kept]  # out × K
    w_kept = w[:, kept] + _solve_symmetric(damped, moved.t(), damp).t()  # A symmetric: (A⁻¹ Mᵀ)ᵀ = M A⁻¹
    return w_kept, b + w @ mu - w_kept @ mu[kept]


def _solve_symmetric(matrix: torch.Tensor, rhs: torch.Tensor, damp: float) -> torch.Tensor:
    """matrix⁻¹ rhs for the damped Σ_KK: by Cholesky (half an LU's work); by LU where Σ, formed as C − μμᵀ in fp32,
    lost its positive definiteness to cancellation (inputs whose spread is below fp32's resolution of their mean)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    try:
        return torch.linalg.solve(matrix, rhs)
    except torch.linalg.LinAlgError:
        raise AdaPrunerError(
            f"the damped input covariance is singular at --damp {damp}: raise --damp or use more calibration windows"
        ) from None


def output_linears(model: nn.Module, plan: PrunePlan) -> dict[str, tuple[nn.Linear, torch.Tensor]]:
    """{module name: (dense output linear, kept input columns)} of every o_proj / down_proj the plan narrows."""
    found = {}
    for index in sorted(set(plan.attention) | set(plan.mlp)):
        info = layer_info(model, index)
        outputs = list(output_projections(model, [index]).items())  # a MoE layer's experts have none to refit
        if index in plan.attention and len(plan.attention[index][0]) < info.n_heads:
            o_name, o_proj = outputs[0]
            found[o_name] = (o_proj, head_channels(plan.attention[index][0], info.head_dim))
        if index in plan.mlp and len(plan.mlp[index]) < info.intermediate and info.experts is None:
            down_name, down_proj = outputs[1]
            found[down_name] = (down_proj, torch.tensor(plan.mlp[index], dtype=torch.long))
    return found


def compensation_updates(
    dense: nn.Module,
    plan: PrunePlan,
    moments_of: Callable[[str], InputMoments],
    mode: str,
    damp: float = DEFAULT_DAMP,
    names: Collection[str] | None = None,
) -> dict[str, Update]:
    """The compensated (weight, bias) of every output linear the plan narrows (of those in `names`, if given), from
    the *dense* model's weights."""
    check_compensation(mode)
    if mode == "none":
        return {}
    updates = {}
    for name, (linear, kept) in output_linears(dense, plan).items():
        if names is not None and name not in names:
            continue
        with weights(linear):
            update = compensated(linear.weight, linear.bias, kept, moments_of(name), mode, damp)
        updates[name] = tuple(t.to(home_device(linear)) for t in update)  # an offloaded one waits in host memory
    return updates


def install(model: nn.Module, updates: dict[str, Update]) -> None:
    """Give the (pruned) model's output linears their compensated weight and a bias, in the model's dtype."""
    for name, (weight, bias) in updates.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, leaf)
        if tuple(old.weight.shape) != tuple(weight.shape):
            raise AdaPrunerError(
                f"{name} is {tuple(old.weight.shape)}, its compensation {tuple(weight.shape)}: apply the plan first"
            )
        dtype, device = old.weight.dtype, home_device(old)
        linear = linear_of(weight.to(device, dtype), bias.to(device, dtype), old.weight.requires_grad)
        setattr(owner, leaf, place_like(linear, old))


def give_output_biases(model: nn.Module) -> bool:
    """Where some o_proj/down_proj carries a (compensation) bias, give every other one a zero bias — so that one config
    flag, `output_bias`, describes all layers — and return True; False where none has one."""
    outputs = output_projections(model, range(len(decoder_layers(model))))
    if all(linear.bias is None for linear in outputs.values()):
        return False
    zero_biases = {}
    for name, linear in outputs.items():
        if linear.bias is None:
            with weights(linear):
                weight = linear.weight.detach().to(home_device(linear))  # an offloaded one waits in host memory
            zero_biases[name] = (weight, weight.new_zeros(linear.out_features))
    install(model, zero_biases)
    return True


def output_inputs(model: nn.Module, plan: PrunePlan) -> dict[str, nn.Linear]:
    """The output linears (o_proj, down_proj) a plan narrows, by name: the ones compensation refits."""
    return {name: linear for name, (linear, _kept) in output_linears(model, plan).items()}


def refit_updates(
    model: nn.Module,
    plan: PrunePlan,
    source: StatisticsSource,
    mode: str,
    damp: float,
    gram_bytes: int | None = None,
) -> dict[str, Update]:
    """The compensated output linears of `plan` from the input moments `source` gives of the dense `model`'s output
    projections. lsq needs each linear's Gram XᵀX/T (in² fp32): they are asked for in runs that fit `gram_bytes`
    (default: half the memory free where the model's inputs go), each run solved and freed before the next — a 70B
    model's 80 down_proj Grams (3.3 GB each) never sit in memory together. bias needs μ alone."""
    check_compensation(mode)
    targets = output_inputs(model, plan)
    if mode == "none" or not targets:
        return {}
    budget = gram_bytes if gram_bytes is not None else device_free_bytes(model_device(model)) // 2
    updates = {}
    for chunk in gram_chunks(targets, budget if mode == "lsq" else None):
        moments = source.input_moments(model, chunk, mode == "lsq")
        updates |= compensation_updates(model, plan, moments.__getitem__, mode, damp, names=chunk)
    return updates


def gram_chunks(linears: dict[str, nn.Linear], budget_bytes: int | None) -> list[dict[str, nn.Linear]]:
    """`linears` in order, cut into runs whose fp32 Grams (in_features² · 4 bytes each) fit `budget_bytes` together
    (None: one run; a linear whose Gram alone is larger gets a run of its own)."""
    chunks: list[dict[str, nn.Linear]] = [{}]
    used = 0
    for name, linear in linears.items():
        size = 4 * linear.in_features**2
        if budget_bytes is not None and chunks[-1] and used + size > budget_bytes:
            chunks.append({})
            used = 0
        chunks[-1][name] = linear
        used += size
    return chunks
