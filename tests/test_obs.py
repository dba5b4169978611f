"""The structured OBS cost and its greedy (issue 22): one unit's cost is the exact refit error, the batched greedy
is the one-by-one greedy at batch 1 and its ranks drop the first units removed, a priority orders it, redundant
channels go first whatever their weight, and an indefinite covariance is projected onto the PSD cone."""

import pytest
import torch

from adapruner.choosing.selection import top_units
from adapruner.model.structure import layer_info, mlp_group
from adapruner.scoring.importance import Importance, LinearStats
from adapruner.scoring.obs import greedy_removal, inverse_hessian, unit_costs
from tests.helpers import tiny_family

DAMP = 0.3


def layer_case(block: int, units: int = 6, tokens: int = 60, seed: int = 0):
    """A tiny output linear (5 × units·block) with correlated, off-centre inputs, and the brute-force refit error."""
    g = torch.Generator().manual_seed(seed)
    width = units * block
    x = (
        torch.randn(tokens, width, generator=g, dtype=torch.float64)
        @ torch.randn(width, width, generator=g, dtype=torch.float64)
        + 0.5
    )
    w = torch.randn(5, width, generator=g, dtype=torch.float64)
    centred = x - x.mean(0)
    cov = centred.t() @ centred / tokens
    lam = DAMP * cov.diagonal().mean()

    def refit_error(removed: list[int]) -> float:
        """min over W' with W'_B = 0 of mean_t ‖(W − W') x̃_t‖² + λ‖W − W'‖², by least squares on the stacked data."""
        gone = {u * block + k for u in removed for k in range(block)}
        kept = [c for c in range(width) if c not in gone]
        design = torch.cat(
            [centred[:, kept] / tokens**0.5, lam.sqrt() * torch.eye(width, dtype=torch.float64)[:, kept]]
        )
        target = torch.cat([centred @ w.t() / tokens**0.5, lam.sqrt() * w.t()])
        fit = torch.linalg.lstsq(design, target).solution
        return float((design @ fit - target).square().sum())

    return w, cov, refit_error


@pytest.mark.parametrize("block", [1, 3])
def test_one_unit_cost_is_the_refit_error_without_it(block):
    w, cov, refit_error = layer_case(block)
    costs = unit_costs(w, inverse_hessian(cov, DAMP), block)
    expected = torch.tensor([refit_error([u]) for u in range(6)], dtype=torch.float64)
    torch.testing.assert_close(costs, expected, rtol=1e-7, atol=1e-9)


def brute_greedy(refit_error, units: int, steps: int, groups: int = 1) -> list[list[int]]:
    """Remove, each step, the unit (one per group) whose removal adds the least exact refit error."""
    removed: list[int] = []
    order = []
    size = units // groups
    for _ in range(steps):
        base = refit_error(removed)
        chosen = []
        for g in range(groups):
            alive = [u for u in range(g * size, (g + 1) * size) if u not in removed]
            chosen.append(min(alive, key=lambda u: refit_error(removed + [u]) - base))
        removed += chosen
        order.append(chosen)
    return order


@pytest.mark.parametrize("block,groups", [(1, 1), (2, 1), (2, 2)])
def test_batch_one_greedy_is_the_one_by_one_greedy(block, groups):
    w, cov, refit_error = layer_case(block, units=6)
    steps = 4 if groups == 1 else 2
    removal = greedy_removal(w, inverse_hessian(cov, DAMP), block, steps, batch=1, groups=groups)
    assert removal.steps == brute_greedy(refit_error, 6, steps, groups)
    removed = [u for step in removal.steps for u in step]
    assert sum(removal.costs) == pytest.approx(refit_error(removed), rel=1e-7)  # step costs add up to the set's
    assert all(c >= 0 for c in removal.costs)


def test_batched_greedy_costs_add_up_and_a_priority_orders_it():
    w, cov, refit_error = layer_case(1, units=12)
    hinv = inverse_hessian(cov, DAMP)
    removal = greedy_removal(w, hinv, 1, 7, batch=3)
    assert [len(s) for s in removal.steps] == [3, 3, 1]
    assert sum(removal.costs) == pytest.approx(refit_error([u for s in removal.steps for u in s]), rel=1e-7)
    priority = torch.arange(12, 0, -1).double()  # another metric's order: highest index first
    ordered = greedy_removal(w, hinv, 1, 4, priority=priority)
    assert ordered.steps == [[11], [10], [9], [8]]
    assert sum(ordered.costs) == pytest.approx(refit_error([8, 9, 10, 11]), rel=1e-7)
    ranks = ordered.ranks()
    assert ranks[11] == 0 and ranks[8] == 3 and ranks[0] == 12  # kept units rank above every removed one


def test_obs_removes_redundant_channels_whatever_their_weight():
    """Channels 5 and 17 copy channels 2 and 9 and carry the largest down_proj weights (l2 keeps them): the refit
    moves a copy's weight onto its original, so obs removes one channel of each pair, at almost no cost."""
    model = tiny_family("llama")
    info = layer_info(model, 0)
    x = torch.randn(400, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:, 5], x[:, 17] = x[:, 2], x[:, 9]
    with torch.no_grad():
        info.mlp.down_proj.weight[:, [5, 17]] *= 10
    stats = {f"{info.mlp_prefix}.down_proj": LinearStats(act_cov=torch.cov(x.t(), correction=0).float())}
    removal = Importance("obs", stats=stats, damp=1e-6).removal(mlp_group(info), 2)
    removed = {u for step in removal.steps for u in step}
    assert len(removed & {2, 5}) == 1 and len(removed & {9, 17}) == 1
    alone = Importance("obs", stats=stats, damp=1e-6)(mlp_group(info))
    assert sum(removal.costs) < 1e-3 * alone.median()
    assert set(Importance("l2")(mlp_group(info)).topk(2).indices.tolist()) == {5, 17}


def test_batched_ranks_drop_exactly_the_first_units_removed():
    w, cov, _ = layer_case(1, units=12)
    removal = greedy_removal(w, inverse_hessian(cov, DAMP), 1, 10, batch=4)
    order = [u for step in removal.steps for u in step]
    ranks = removal.ranks()
    for n_remove in (3, 5, 10):  # mid-step counts too: a step's units in the order of their costs
        assert sorted(set(range(12)) - set(top_units(ranks, 12 - n_remove))) == sorted(order[:n_remove])


def test_a_slightly_indefinite_covariance_is_projected_onto_the_psd_cone():
    """Σ = C − μμᵀ in fp32 can lose its PSD-ness to cancellation: the inverse is that of the nearest PSD Σ, damped."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    cov = x.t() @ x / 4 - 1e-3 * torch.eye(6, dtype=torch.float64)  # rank 4 less a little: two negative eigenvalues
    damp = 1e-6
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(cov + damp * cov.diagonal().mean() * torch.eye(6, dtype=torch.float64))
    values, vectors = torch.linalg.eigh(cov)
    nearest = vectors @ torch.diag(values.clamp_min(0)) @ vectors.t()
    lam = damp * cov.diagonal().mean()
    expected = torch.linalg.inv(nearest + lam * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(inverse_hessian(cov, damp), expected)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-7), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("block", "units", "removing"), [(1, 12, (7, 3, 1)), (3, 8, (5, 1, 1)), (2, 12, (3, 1, 3))])
def test_a_fixed_order_is_costed_from_one_factorisation_as_the_rank_updates_cost_it(
    block, units, removing, dtype, rtol
):
    """`ordered_removal` (one Cholesky, one product) takes the greedy's steps in a priority's order and costs each as
    the step-by-step fp64 rank updates do (batches, blocks and groups), its energy tr(W H Wᵀ): to 1e-7 relative in
    fp64, to 1e-5 in fp32 (what the allocation runs, `CURVE_DTYPE`)."""
    from adapruner.scoring.obs import CURVE_DTYPE, ordered_removal, ordered_removal_by_updates, output_energy

    assert CURVE_DTYPE == torch.float32
    w, cov, refit_error = layer_case(block, units=units, seed=5)
    priority = torch.randn(units, generator=torch.Generator().manual_seed(9)).double()
    updated = ordered_removal_by_updates(w, cov, DAMP, block, removing, priority)
    factorised = ordered_removal(w, cov, DAMP, block, removing, priority, dtype)
    assert factorised.steps == updated.steps
    torch.testing.assert_close(
        torch.tensor(factorised.costs, dtype=torch.float64),
        torch.tensor(updated.costs, dtype=torch.float64),
        rtol=rtol,
        atol=0,
    )
    assert factorised.energy == pytest.approx(output_energy(w, cov, DAMP), rel=rtol)
    removed = [u for step in factorised.steps for u in step]
    assert sum(factorised.costs) == pytest.approx(refit_error(removed), rel=rtol)


def test_an_indefinite_covariance_is_projected_before_the_factorisation():
    from adapruner.scoring.obs import ordered_removal

    w, cov, _refit_error = layer_case(1, units=6, seed=2)
    values, vectors = torch.linalg.eigh(cov)
    indefinite = (vectors * values.clone().index_fill_(0, torch.tensor([0]), -5.0)) @ vectors.t()
    priority = torch.arange(6).double()
    updated = greedy_removal(w, inverse_hessian(indefinite, DAMP), 1, 4, priority=priority)
    for dtype, rtol in ((torch.float64, 1e-7), (torch.float32, 1e-5)):
        factorised = ordered_removal(w, indefinite, DAMP, 1, (4, 1, 1), priority, dtype)
        torch.testing.assert_close(
            torch.tensor(factorised.costs, dtype=torch.float64),
            torch.tensor(updated.costs, dtype=torch.float64),
            rtol=rtol,
            atol=0,
        )


@pytest.mark.parametrize("n", [1, 5, 16, 37])
def test_the_blocked_upper_product_is_the_product(n):
    from adapruner.scoring.obs import upper_product

    g = torch.Generator().manual_seed(n)
    matrix, upper = torch.randn(7, n, generator=g), torch.randn(n, n, generator=g).triu()
    torch.testing.assert_close(upper_product(matrix, upper), matrix @ upper)
