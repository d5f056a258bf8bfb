"""The promotion gate calls a drop only when it is larger than allowed and real (McNemar), and
refuses to judge a task evaluated on too few examples."""
from __future__ import annotations

import pytest

from moecl.mlops.gate import GateThresholds, decide, mcnemar_worse

GATE = GateThresholds(min_new_task_accuracy=0.5, max_old_task_drop=0.05, significance=0.05, min_eval_examples=40)


def _answers(right: int, total: int) -> list[bool]:
    return [True] * right + [False] * (total - right)


def test_mcnemar_p_value_counts_only_the_examples_one_model_gets_right():
    assert mcnemar_worse(_answers(5, 5), _answers(0, 5)) == pytest.approx(1 / 32)  # 5 lost, 0 won
    assert mcnemar_worse([True, False], [False, True]) == pytest.approx(0.75)  # 1 lost, 1 won: P(X >= 1 | n=2)
    assert mcnemar_worse(_answers(7, 10), _answers(7, 10)) == 1.0  # no discordant example


def test_a_drop_of_a_few_examples_is_noise_and_a_large_one_is_called():
    champion = {"old": _answers(40, 50)}
    noisy = {"old": [True] * 37 + [False] * 3 + [False] * 10, "new": _answers(45, 50)}  # 3 examples lost: 6 points
    assert decide(noisy, champion, ["new"], GATE).passed
    broken = {"old": _answers(25, 50), "new": _answers(45, 50)}  # 15 lost, none won
    decision = decide(broken, champion, ["new"], GATE)
    assert not decision.passed and "task old: accuracy fell 0.800 -> 0.500" in decision.reasons[0]
    assert "McNemar p=" in decision.reasons[0]


def test_a_task_with_too_few_test_examples_blocks_promotion():
    decision = decide({"new": _answers(20, 20)}, None, ["new"], GATE)
    assert not decision.passed and decision.reasons == ["task new: 20 test examples < 40 needed to judge it"]
    assert not decide({"new": _answers(10, 40)}, None, ["new"], GATE).passed  # 0.25 < 0.5 on a new task
    assert decide({"new": _answers(30, 40)}, None, ["new"], GATE).passed


def test_the_automation_share_is_the_largest_confident_prefix_at_the_precision_target():
    from moecl.metrics import automation_coverage

    margins = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.0]
    correct = [True, True, True, True, False, True, False, False]
    assert automation_coverage(margins, correct, 1.0) == (0.5, 2.0)  # the 4 surest are all right
    assert automation_coverage(margins, correct, 0.8) == (0.75, 0.5)  # 5 of the 6 surest: 0.83
    assert automation_coverage(margins[::-1], correct[::-1], 1.0) == (0.5, 2.0)  # order of input does not matter
    assert automation_coverage([1.0, 2.0], [False, False], 0.9) == (0.0, float("inf"))


def test_the_automation_share_can_be_a_gate_rule():
    rule = GateThresholds(min_new_task_accuracy=0.0, min_eval_examples=0, min_automation=0.6)
    decision = decide({"new": _answers(30, 40)}, None, ["new"], rule, automation={"new": 0.4})
    assert not decision.passed and "0.400 of items can be decided automatically < required 0.600" in decision.reasons[0]
    assert decide({"new": _answers(30, 40)}, None, ["new"], rule, automation={"new": 0.7}).passed
