"""Continual-learning metrics against a matrix computed by hand."""
import pytest

from moecl.metrics import backward_transfer, forgetting, mean_ci, summarise

R = [
    [0.90],
    [0.70, 0.80],
    [0.60, 0.75, 0.50],
]


def test_metrics_match_hand_computation():
    m = summarise(["a", "b", "c"], R, before_training=[0.2, 0.4, 0.3], baseline=[0.25, 0.3, 0.2])
    assert m["aa"] == pytest.approx((0.60 + 0.75 + 0.50) / 3)
    assert m["bwt"] == pytest.approx(((0.60 - 0.90) + (0.75 - 0.80)) / 2)  # -0.175
    assert m["forgetting"] == pytest.approx({"a": 0.30, "b": 0.05})
    assert m["fwt"] == pytest.approx(((0.4 - 0.3) + (0.3 - 0.2)) / 2)


def test_single_row_has_no_backward_transfer():
    m = summarise(["a", "b"], [[0.5, 0.7]])
    assert m["aa"] == pytest.approx(0.6)
    assert m["bwt"] is None and m["forgetting"] == {} and m["fwt"] is None


def test_mean_and_95_percent_interval_over_seeds():
    stat = mean_ci([0.1, 0.2, 0.3])
    assert stat["mean"] == pytest.approx(0.2)
    assert stat["ci95"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5)  # t(2 df) x sd / sqrt(n)
    assert mean_ci([0.5]) == {"mean": 0.5, "ci95": None}


def test_forgetting_skips_cells_that_were_not_evaluated():
    matrix = [[0.8], [None, 0.6], [0.7, 0.5, 0.9]]
    assert forgetting(matrix) == pytest.approx([0.1, 0.1])
    assert backward_transfer(matrix) == pytest.approx((-0.1 - 0.1) / 2)
