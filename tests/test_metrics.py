"""Continual-learning metrics against a matrix computed by hand."""
import pytest

from moecl.metrics import backward_transfer, forgetting, mean_ci, plot_heatmap, summarise

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
    stages = [["a"], ["b"], ["c"]]
    assert forgetting(matrix, ["a", "b", "c"], stages) == pytest.approx({"a": 0.1, "b": 0.1})
    assert backward_transfer(matrix, ["a", "b", "c"], stages) == pytest.approx((-0.1 - 0.1) / 2)


def test_a_retrained_task_is_measured_from_its_last_training():
    # Stages: a, b, then a again (its data changed). Columns stay the model's tasks [a, b].
    matrix = [[0.5], [0.4, 0.8], [0.9, 0.7]]
    m = summarise(["a", "b"], matrix, before_training=[0.1, 0.2, 0.4], baseline=[0.1, 0.3],
                  stages=[["a"], ["b"], ["a"]])
    assert m["aa"] == pytest.approx(0.8)
    assert m["bwt"] == pytest.approx(0.7 - 0.8)  # only b: a was trained by the last stage
    assert m["forgetting"] == pytest.approx({"b": 0.1})
    assert m["fwt"] == pytest.approx(0.2 - 0.3)  # b's introduction only; a's retraining is no transfer
    # b retrained last: a is measured from its only training, b is not measured
    m = summarise(["a", "b"], [[0.5], [0.4, 0.8], [0.3, 0.9]], stages=[["a"], ["b"], ["b"]])
    assert m["bwt"] == pytest.approx(0.3 - 0.5) and m["forgetting"] == pytest.approx({"a": 0.2})


def test_a_heatmap_with_more_stages_than_tasks_needs_no_stage_names(tmp_path):
    plot_heatmap(["a", "b"], [[0.5], [0.4, 0.9], [0.7, 0.8]], tmp_path / "h.png", "retrained")
    assert (tmp_path / "h.png").stat().st_size > 0
