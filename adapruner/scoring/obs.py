"""Structured Optimal Brain Surgeon on an output projection (SlimGPT's selection, damped as the lsq refit).

An output linear W (out × in) loses its input columns in units of `block` consecutive columns (a head's block of
o_proj columns, an MLP channel's down_proj column). With the calibration inputs' covariance Σ = C − μμᵀ and
H = Σ + λI, λ = damp · mean diag Σ, removing the unit set B costs
    cost(B) = tr(W_B [(H⁻¹)_BB]⁻¹ W_Bᵀ) = min over W' with W'_B = 0 of  mean_t ‖(W − W')(x_t − μ)‖² + λ ‖W − W'‖²_F
— the output error after the best damped refit of the kept columns (the bias absorbs the mean; the refit is
W − W_B [(H⁻¹)_BB]⁻¹ (H⁻¹)_B:, the one `compensation.compensated` computes in closed form).
Greedy removal in steps: score every remaining unit alone, remove the `batch` cheapest (one per group where units
come in groups: query heads inside kv groups), then update
    W ← W − W_B [(H⁻¹)_BB]⁻¹ (H⁻¹)_B:        H⁻¹ ← H⁻¹ − (H⁻¹)_:B [(H⁻¹)_BB]⁻¹ (H⁻¹)_B:
so the next step scores the units as they are after the refit; the step costs add up to cost(all removed).
Arithmetic in fp64 (H⁻¹ loses precision in fp32 as units go).

Where another metric fixes the order (`priority`), the costs need no rank updates (`ordered_removal`): with the
columns permuted into removal order (kept ones last), P H Pᵀ = Ũ Ũᵀ with Ũ upper triangular (the Cholesky factor of
the reversed matrix, reversed), so P H⁻¹ Pᵀ = Uᵀ U with U = Ũ⁻¹ — the factor GPTQ's updates walk — and the refit
errors E = W Pᵀ U⁻¹ = W Pᵀ Ũ give every step's cost as ‖E_B‖²_F of its columns (and tr(W H Wᵀ) = ‖E‖²_F): one
Cholesky and one product per module instead of a rank update per step, in fp32 (`CURVE_DTYPE`: the damped H is well
conditioned — SmolLM2's curves agree with the fp64 rank updates' within 4e-7 relative, docs/results.md — at twice
the speed of fp64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapruner.errors import AdaPrunerError

CURVE_DTYPE = torch.float32  # `ordered_removal`'s factorisation and product
GREEDY_STEPS = 128  # a module's units go in steps of n/128 (SlimGPT's batched greedy; 1 at ≤ 255 units)


def greedy_batch(n_units: int) -> int:
    """Units removed per greedy step in a module of `n_units`: max(1, n_units // GREEDY_STEPS)."""
    return max(1, n_units // GREEDY_STEPS)


@dataclass
class Removal:
    """A greedy removal: the units each step removed and the error each step added (fp64 sums), out of `n_units`."""

    steps: list[list[int]]  # each step's units, cheapest first (one per group, groups in order, with groups)
    costs: list[float]
    n_units: int
    energy: float = 1.0  # tr(W H Wᵀ) = the output's variance + λ‖W‖² (`output_energy`): the cost of removing all

    def ranks(self) -> torch.Tensor:
        """A score per unit for `selection.top_units`: its place in the removal order (a step's units in the order
        of their costs), `n_units` for units that stay; keeping the highest ranks drops the first ones removed."""
        rank = torch.full((self.n_units,), float(self.n_units))
        order = torch.tensor([u for units in self.steps for u in units], dtype=torch.long)
        rank[order] = torch.arange(order.numel(), dtype=rank.dtype)
        return rank


def damping(covariance: torch.Tensor, damp: float) -> torch.Tensor:
    """λ = damp · mean diag Σ (fp64)."""
    if not damp > 0:
        raise AdaPrunerError(f"--obs-damp {damp}: the obs metric needs a damping above 0")
    return damp * covariance.double().diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)


def output_energy(weight: torch.Tensor, covariance: torch.Tensor, damp: float) -> float:
    """tr(W H Wᵀ) = tr(W Σ Wᵀ) + λ‖W‖², H = Σ + λI: the error of removing every unit (fp64)."""
    w = weight.double()
    return float(((w @ covariance.double()) * w).sum() + damping(covariance, damp) * w.square().sum())


def inverse_hessian(covariance: torch.Tensor, damp: float) -> torch.Tensor:
    """(Σ + λI)⁻¹, λ = damp · mean diag Σ, in fp64. Σ = C − μμᵀ formed in fp32 can come out slightly indefinite
    (cancellation where the mean dwarfs the spread); where Cholesky fails, Σ is first projected onto the PSD cone
    (negative eigenvalues set to 0, the nearest covariance)."""
    cov = covariance.double()
    lam = damping(cov, damp)
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(cov + lam * torch.eye(cov.shape[0], device=cov.device)))
    except torch.linalg.LinAlgError:
        pass
    values, vectors = torch.linalg.eigh((cov + cov.t()) / 2)
    return (vectors / (values.clamp_min(0) + lam)) @ vectors.t()


def cholesky_of_hessian(
    covariance: torch.Tensor, damp: float, order: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The lower Cholesky factor of H = Σ + λI (in `dtype`) with rows and columns taken in `order`; Σ projected onto
    the PSD cone first (in fp64) where Cholesky fails (as `inverse_hessian` does)."""
    lam = damping(covariance, damp)
    hessian = covariance.to(dtype).index_select(0, order).index_select(1, order)
    hessian.diagonal().add_(lam.to(dtype))
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info) == 0:
        return factor
    cov = covariance.double()
    values, vectors = torch.linalg.eigh((cov + cov.t()) / 2)
    projected = (vectors * (values.clamp_min(0) + lam)) @ vectors.t()
    return torch.linalg.cholesky(((projected + projected.t()) / 2)[order[:, None], order].to(dtype))


def unit_costs(weight: torch.Tensor, hinv: torch.Tensor, block: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """cost({u}) = tr(W_u [(H⁻¹)_uu]⁻¹ W_uᵀ) of every unit u (`block` columns each) alone; +inf where not `alive`."""
    w = weight.double()
    n = w.shape[1] // block
    diag = hinv.double().view(n, block, n, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # n × block × block
    if alive is not None:
        diag = torch.where(alive[:, None, None], diag, torch.eye(block, dtype=diag.dtype, device=diag.device))
    columns = w.view(w.shape[0], n, block).permute(1, 2, 0)  # n × block × out
    costs = (columns * torch.linalg.solve(diag, columns)).sum((1, 2))
    return costs if alive is None else costs.masked_fill(~alive, float("inf"))


def greedy_removal(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    block: int,
    n_remove: int,
    batch: int = 1,
    groups: int = 1,
    priority: torch.Tensor | None = None,
) -> Removal:
    """Remove `n_remove` units greedily (see the module docstring): `batch` units a step, or with `groups` > 1 one
    unit of each of the `groups` equal runs of units a step, `n_remove` steps. `priority` (one score per unit, lower
    goes first) replaces the current OBS cost as the order — another metric's ranking, still costed by OBS."""
    w, h = weight.detach().double().clone(), hinv.double().clone()
    n = w.shape[1] // block
    if groups > 1 and batch != 1:
        raise AdaPrunerError("a greedy step removes one unit of each group: pass batch 1 with groups")
    if n_remove * (groups if groups > 1 else 1) > n:
        raise AdaPrunerError(f"cannot remove {n_remove} of {n} units")
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    removal = Removal([], [], n)
    left = n_remove
    while left > 0:
        scores = unit_costs(w, h, block, alive) if priority is None else _masked(priority, alive)
        chosen = _step(scores, groups, batch, left)
        left -= 1 if groups > 1 else len(chosen)
        columns = torch.tensor([u * block + k for u in chosen for k in range(block)], device=w.device)
        h_bb = h[columns][:, columns]
        update = torch.linalg.solve(h_bb, h[columns])  # [(H⁻¹)_BB]⁻¹ (H⁻¹)_B:
        removal.costs.append(float((w[:, columns] * torch.linalg.solve(h_bb, w[:, columns].t()).t()).sum()))
        removal.steps.append(chosen)
        w -= w[:, columns] @ update
        h -= h[:, columns] @ update
        alive[chosen] = False
    return removal


def ordered_removal(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    damp: float,
    block: int,
    removing: tuple[int, int, int],
    priority: torch.Tensor,
    dtype: torch.dtype = CURVE_DTYPE,
) -> Removal:
    """`greedy_removal` in the fixed order of `priority` (lower goes first), `removing` = (n_remove, batch, groups)
    as there: the same steps, each costed from one factorisation in `dtype` (module docstring), the costs summed in
    fp64; its `energy` is tr(W H Wᵀ)."""
    n_remove, batch, groups = removing
    n = weight.shape[1] // block
    if n_remove * (groups if groups > 1 else 1) > n:
        raise AdaPrunerError(f"cannot remove {n_remove} of {n} units")
    alive = torch.ones(n, dtype=torch.bool, device=weight.device)
    removal = Removal([], [], n)
    left, priority = n_remove, priority.double().to(weight.device)
    while left > 0:
        chosen = _step(_masked(priority, alive), groups, batch, left)
        left -= 1 if groups > 1 else len(chosen)
        removal.steps.append(chosen)
        alive[chosen] = False
    units = [u for step in removal.steps for u in step] + alive.nonzero().flatten().tolist()  # kept ones last
    order = (
        torch.tensor(units, device=weight.device)[:, None] * block + torch.arange(block, device=weight.device)
    ).flatten()
    reversed_order = order.flip(0)
    factor = cholesky_of_hessian(covariance, damp, reversed_order, dtype).flip(0, 1)  # Ũ: P H Pᵀ = Ũ Ũᵀ
    errors = upper_product(weight.detach().to(dtype).index_select(1, order), factor)  # E = W Pᵀ Ũ
    column_costs = errors.square().sum(0).double().view(n, block).sum(1)  # per unit, in removal order
    costs = torch.split(column_costs[: sum(len(step) for step in removal.steps)], [len(s) for s in removal.steps])
    removal.costs = [float(c.sum()) for c in costs]
    removal.energy = float(column_costs.sum())
    return removal


def upper_product(matrix: torch.Tensor, upper: torch.Tensor, blocks: int = 8) -> torch.Tensor:
    """matrix @ upper for an upper triangular `upper`, in `blocks` column blocks, each skipping the zero rows below
    its last column: (blocks + 1) / (2 · blocks) of a full product's work."""
    n = upper.shape[0]
    product = torch.empty(matrix.shape[0], n, dtype=matrix.dtype, device=matrix.device)
    edges = [n * j // blocks for j in range(blocks + 1)]
    for start, stop in zip(edges, edges[1:]):
        product[:, start:stop] = matrix[:, :stop] @ upper[:stop, start:stop]
    return product


def ordered_removal_by_updates(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    damp: float,
    block: int,
    removing: tuple[int, int, int],
    priority: torch.Tensor,
) -> Removal:
    """`ordered_removal`'s reference (tests, `bench.curve_cost`): the same steps costed by `greedy_removal`'s rank
    updates of W and H⁻¹, the energy by `output_energy`."""
    n_remove, batch, groups = removing
    removal = greedy_removal(weight, inverse_hessian(covariance, damp), block, n_remove, batch, groups, priority)
    removal.energy = output_energy(weight, covariance, damp)
    return removal


def _step(scores: torch.Tensor, groups: int, batch: int, left: int) -> list[int]:
    """The units a greedy step removes: the lowest-scored of each of `groups` equal runs, or the `batch` lowest."""
    if groups > 1:
        n = scores.numel()
        return (scores.view(groups, -1).argmin(1) + torch.arange(groups, device=scores.device) * (n // groups)).tolist()
    return scores.topk(min(batch, left), largest=False).indices.tolist()


def _masked(priority: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    return priority.to(alive.device, torch.float64).masked_fill(~alive, float("inf"))
