"""The promotion gate compares like with like (the champion's tasks, on the same examples), calls a
drop only when it is larger than allowed and real (McNemar), judges a trained task on its own
(floor, above chance), refuses to judge a task evaluated on too few examples, and can only be
tightened by a run."""
from __future__ import annotations

import pytest

from moecl.mlops.gate import STRICTER, GateThresholds, above_chance_p, decide, mcnemar_worse
from moecl.mlops.tightening import tighten

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


def test_a_candidate_that_keeps_everything_and_learns_its_task_passes_whatever_the_champions_aa():
    gate = GateThresholds(min_new_task_accuracy=0.6, max_aa_drop=0.05, min_eval_examples=40)
    champion = {"easy": _answers(45, 50)}  # AA 0.90
    candidate = {"easy": _answers(45, 50), "new": _answers(33, 50)}  # nothing lost; new task 0.66: AA of all 0.78
    decision = decide(candidate, champion, ["new"], gate, chance={"new": 0.25})
    assert decision.passed, decision.reasons


def test_a_real_drop_is_rejected_even_when_an_easy_new_task_lifts_the_average():
    gate = GateThresholds(min_new_task_accuracy=0.6, max_old_task_drop=0.3, max_aa_drop=0.05, min_eval_examples=40)
    champion = {"a": _answers(40, 50), "b": _answers(40, 50)}  # AA 0.80
    candidate = {"a": _answers(40, 50), "b": _answers(28, 50), "new": _answers(50, 50)}  # b: 12 lost; AA of all 0.787
    decision = decide(candidate, champion, ["new"], gate)
    assert not decision.passed
    assert decision.reasons == ["AA on the champion's tasks 0.680 is below the champion's 0.800 by more than 0.050 "
                                f"(McNemar p={mcnemar_worse(_answers(80, 100), _answers(68, 100)):.3g} over their examples)"]


def test_a_retrained_task_is_judged_on_its_own_not_against_the_champions_old_answers():
    gate = GateThresholds(min_new_task_accuracy=0.5, max_old_task_drop=0.05, min_eval_examples=40)
    champion = {"t": _answers(45, 50)}
    changed = {"t": _answers(30, 50)}  # new data, new labels: the champion's 0.9 was on another task
    assert decide(changed, champion, ["t"], gate).passed
    assert not decide(changed, champion, [], gate).passed  # left alone, the same fall is forgetting


def test_a_trained_task_must_beat_chance_beyond_doubt():
    assert above_chance_p(_answers(12, 40), 0.2) == pytest.approx(0.0875, abs=1e-3)  # 0.30 on 5 labels
    gate = GateThresholds(min_new_task_accuracy=0.3, min_eval_examples=40)
    decision = decide({"new": _answers(12, 40)}, None, ["new"], gate, chance={"new": 0.2})
    assert not decision.passed and "not clearly above chance 0.200 (binomial p=0.0875 >= 0.05)" in decision.reasons[0]
    assert decide({"new": _answers(16, 40)}, None, ["new"], gate, chance={"new": 0.2}).passed  # 0.40: p 0.003
    assert decide({"new": _answers(12, 40)}, None, ["new"], GateThresholds(min_new_task_accuracy=0.3, max_chance_p=1.0,
                                                                            min_eval_examples=40), chance={"new": 0.2}).passed


def test_a_trained_task_can_be_held_to_a_chance_corrected_floor():
    gate = GateThresholds(min_new_task_accuracy=0.3, min_eval_examples=30, min_new_task_skill=0.25)
    five_way = decide({"stars": _answers(13, 40)}, None, ["stars"], gate, chance={"stars": 0.2})  # 0.325: p 0.043
    assert not five_way.passed and five_way.reasons == [
        "task stars: accuracy 0.325 closes 0.156 of the gap from chance 0.200 to 1 < required 0.250"]
    assert decide({"news": _answers(25, 32), "stars": _answers(19, 40)}, None, ["news", "stars"], gate,
                  chance={"news": 0.25, "stars": 0.2}).passed  # 0.78 of 4 labels: 0.71; 0.475 of 5: 0.34


def test_a_run_can_tighten_the_deployed_gate_and_rules_but_never_loosen_them():
    from moecl.mlops.validation import STRICTER as RULES_STRICTER
    from moecl.mlops.validation import ValidationRules

    deployed = GateThresholds(min_new_task_accuracy=0.6, max_old_task_drop=0.02, max_aa_drop=0.02, min_eval_examples=100)
    asked = {"min_new_task_accuracy": 0.0, "max_old_task_drop": 1.0, "max_aa_drop": 0.01, "min_eval_examples": 0,
             "max_chance_p": 1.0, "significance": 0.5}
    assert tighten(deployed, asked, STRICTER) == GateThresholds(
        min_new_task_accuracy=0.6, max_old_task_drop=0.02, max_aa_drop=0.01, min_eval_examples=100, significance=0.5)
    with pytest.raises(ValueError, match="unknown setting 'max_drop'"):
        tighten(deployed, {"max_drop": 1.0}, STRICTER)
    rules = ValidationRules(min_rows_per_label_train=200, max_text_chars=5000, allow_label_change=False)
    loose = {"min_rows_per_label_train": 1, "max_text_chars": 10**6, "allow_label_change": True, "min_text_chars": 5}
    assert tighten(rules, loose, RULES_STRICTER) == ValidationRules(min_rows_per_label_train=200, max_text_chars=5000,
                                                                    min_text_chars=5)
