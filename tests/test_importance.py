"""Metrics on hand-computed cases, aggregation, and unit (head) sums."""

import pytest
import torch

from adapruner.errors import AdaPrunerError
from adapruner.kernels.channel_importance import channel_importance_torch
from adapruner.model.structure import Group, Member
from adapruner.scoring.importance import Importance, LinearStats, aggregate, unit_scores

W = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
G = torch.tensor([[0.5, 1.0, -1.0], [2.0, -1.0, 0.5]])
F = torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.0, 2.0]])
A = torch.tensor([1.0, 2.0, 3.0])

# Every expected value below is worked out by hand from W, G, F, A.
ROWS = {
    "l1": [6.0, 15.0],
    "l2": [14.0, 77.0],
    "taylor1": [0.5 + 2.0 + 3.0, 8.0 + 5.0 + 3.0],  # |W·G| = [.5, 2, 3], [8, 5, 3]
    "vector": [abs(0.5 - 2.0 - 3.0), abs(-8.0 - 5.0 - 3.0)],  # |Σ W·G| = 4.5, 16
    "taylor2": [0.5 * (1 + 8 + 0), 0.5 * (8 + 25 + 72)],  # ½ W²F = [.5, 4, 0], [4, 12.5, 36]
    "mix": [abs(0.5 - 0.5) + abs(-2 - 4) + abs(-3 - 0), abs(-8 - 4) + abs(-5 - 12.5) + abs(-3 - 36)],
    "act": [1.0 + 4 + 9, 4.0 + 10 + 18],
}
COLS = {
    "l1": [5.0, 7.0, 9.0],
    "taylor1": [0.5 + 8.0, 2.0 + 5.0, 3.0 + 3.0],
    "vector": [abs(0.5 - 8.0), abs(-2.0 - 5.0), abs(-3.0 - 3.0)],
    "taylor2": [0.5 + 4.0, 4.0 + 12.5, 0.0 + 36.0],
    "act": [5.0, 14.0, 27.0],
}


@pytest.mark.parametrize("metric", sorted(ROWS))
def test_row_scores_match_hand_computation(metric):
    got = channel_importance_torch(metric, W, 0, grad=G, fisher=F, act_norm=A)
    torch.testing.assert_close(got, torch.tensor(ROWS[metric]))


@pytest.mark.parametrize("metric", sorted(COLS))
def test_column_scores_match_hand_computation(metric):
    got = channel_importance_torch(metric, W, 1, grad=G, fisher=F, act_norm=A)
    torch.testing.assert_close(got, torch.tensor(COLS[metric]))


def test_half_precision_inputs_accumulate_in_fp32():
    got = channel_importance_torch("taylor1", W.bfloat16(), 0, grad=G.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(ROWS["taylor1"]))


def test_missing_statistic_is_a_clear_error():
    with pytest.raises(ValueError, match="needs grad"):
        channel_importance_torch("taylor1", W, 0)


def test_aggregations():
    scores = torch.tensor([[1.0, 4.0], [3.0, 2.0], [2.0, 0.5]])
    assert aggregate(scores, "sum").tolist() == [6.0, 6.5]
    assert aggregate(scores, "mean").tolist() == pytest.approx([2.0, 6.5 / 3])
    assert aggregate(scores, "max").tolist() == [3.0, 4.0]
    assert aggregate(scores, "prod").tolist() == [6.0, 4.0]
    assert aggregate(scores, "first").tolist() == [1.0, 4.0]
    with pytest.raises(AdaPrunerError, match="unknown aggregation"):
        aggregate(scores, "median")


def test_unit_scores_sum_blocks():
    assert unit_scores(torch.arange(6.0), 3).tolist() == [3.0, 12.0]


def test_importance_combines_members_per_unit():
    rows = torch.nn.Linear(3, 4, bias=False)
    cols = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        rows.weight.copy_(torch.arange(12.0).view(4, 3))
        cols.weight.copy_(-torch.ones(3, 4))
    group = Group(0, "mlp", (Member("a", rows, 0, 2), Member("b", cols, 1, 2)), 2)
    # l1 rows: 3, 12, 21, 30 → units (0+1, 2+3) = 15, 51; columns: 3 each → units 6, 6
    assert Importance("l1", "sum")(group).tolist() == [21.0, 57.0]
    assert Importance("l1", "first")(group).tolist() == [15.0, 51.0]
    assert Importance("l1", "max")(group).tolist() == [15.0, 51.0]


def test_random_metric_is_reproducible_and_seeded():
    lin = torch.nn.Linear(3, 8)
    group = Group(0, "mlp", (Member("m", lin, 0, 1),), 8)
    assert torch.equal(Importance("random", seed=3)(group), Importance("random", seed=3)(group))
    assert not torch.equal(Importance("random", seed=3)(group), Importance("random", seed=4)(group))


def test_data_metric_without_stats_names_the_fix():
    group = Group(0, "mlp", (Member("m", torch.nn.Linear(3, 4), 0, 1),), 4)
    with pytest.raises(AdaPrunerError, match="--calib"):
        Importance("taylor1", stats={"m": LinearStats()})(group)


def test_the_metric_s_registry_entry_is_definition_and_spec_warns_for_one_release():
    importance = Importance("taylor2")
    assert importance.definition.name == "taylor2" and importance.definition.needs == {"fisher"}
    with pytest.warns(DeprecationWarning, match="Importance.definition"):
        assert importance.spec is importance.definition
