"""The promotion gate: a candidate replaces the champion only if it learned what is new without
giving up what the champion could do.

Like is compared with like. The champion's tasks that this run did not retrain are compared on the
same test examples: a drop on one counts only when it is both larger than allowed and real
(McNemar's exact test on the examples where exactly one of the two models is right), and the AA
rule averages these tasks only, for both models (and also needs McNemar's test, over all their
examples, to call the drop real). A task this run added or retrained is judged by
its own rules: an accuracy floor, accuracy above chance beyond doubt (a one-sided binomial test),
and optionally a floor on its chance-corrected accuracy, so a task the budget did not learn is never
promoted because its labels are few. A task
evaluated on fewer than `min_eval_examples` examples cannot be judged at all, and blocks the promotion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GateThresholds:
    min_new_task_accuracy: float = 0.25  # every new or changed task must reach this accuracy
    max_old_task_drop: float = 0.05  # no champion task may lose more than this (absolute accuracy) ...
    significance: float = 0.05  # ... with McNemar's one-sided p-value below this
    max_aa_drop: float = 0.05  # candidate AA may sit at most this far below the champion's AA
    min_eval_examples: int = 40  # fewer test examples of a task than this: no decision, no promotion
    # every task must let at least this share of its items be answered automatically at the
    # evaluation's precision target (eval.automation_precision); 0 turns the rule off
    min_automation: float = 0.0
    # a new or changed task counts as learned only if its accuracy beating chance has a one-sided
    # binomial p-value below this; 1 turns the rule off
    max_chance_p: float = 0.05
    # ... and must close at least this share of the gap from chance to perfect, (accuracy - chance) /
    # (1 - chance): a 5-way task at 0.33 beats chance yet answers no better than a 2-way coin; 0: off
    min_new_task_skill: float = 0.0


# For each threshold, the stricter of two values: a run may tighten the deployed gate, never loosen it.
STRICTER = {"min_new_task_accuracy": max, "max_old_task_drop": min, "significance": max, "max_aa_drop": min,
            "min_eval_examples": max, "min_automation": max, "max_chance_p": min, "min_new_task_skill": max}


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]


def mcnemar_worse(champion: list[bool], candidate: list[bool]) -> float:
    """One-sided exact McNemar p-value that the candidate is worse: of the examples only one model
    gets right, the chance that at least this many are the champion's if each were a coin flip."""
    lost = sum(a and not b for a, b in zip(champion, candidate))
    won = sum(b and not a for a, b in zip(champion, candidate))
    n = lost + won
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n if n else 1.0


def above_chance_p(correct: list[bool], chance: float) -> float:
    """One-sided exact binomial p-value of at least this many right answers by guessing at `chance`."""
    n, right = len(correct), sum(correct)
    return sum(math.comb(n, k) * chance**k * (1 - chance) ** (n - k) for k in range(right, n + 1))


def _accuracy(correct: list[bool]) -> float:
    return sum(correct) / len(correct)


def compared_tasks(champion: dict | None, trained: list[str]) -> list[str]:
    """The champion's tasks this run left alone: the ones candidate and champion are compared on."""
    return [task for task in (champion or {}) if task not in trained]


def decide(candidate: dict[str, list[bool]], champion: dict[str, list[bool]] | None, trained: list[str],
           thresholds: GateThresholds, automation: dict[str, float] | None = None,
           chance: dict[str, float] | None = None) -> GateDecision:
    """`candidate`/`champion`: per task, whether each test example was answered right (the same
    examples in the same order for both); `trained`: the tasks this run added or changed;
    `automation`: per task, the candidate's share of items decidable alone; `chance`: per task, the
    accuracy of a guess (1 / number of labels). Without a champion only the size, trained-task and
    automation rules apply."""
    reasons = []
    for task, share in (automation or {}).items():
        if share < thresholds.min_automation:
            reasons.append(f"task {task}: {share:.3f} of items can be decided automatically < required "
                           f"{thresholds.min_automation:.3f}")
    for task, correct in candidate.items():
        if len(correct) < thresholds.min_eval_examples:
            reasons.append(f"task {task}: {len(correct)} test examples < {thresholds.min_eval_examples} needed to judge it")
    for task in trained:
        accuracy = _accuracy(candidate[task])
        if accuracy < thresholds.min_new_task_accuracy:
            reasons.append(f"task {task}: accuracy {accuracy:.3f} < required {thresholds.min_new_task_accuracy:.3f}")
        if chance and task in chance:
            p_value = above_chance_p(candidate[task], chance[task])
            if p_value >= thresholds.max_chance_p:
                reasons.append(f"task {task}: accuracy {accuracy:.3f} is not clearly above chance {chance[task]:.3f} "
                               f"(binomial p={p_value:.3g} >= {thresholds.max_chance_p}): not learned")
            skill = (accuracy - chance[task]) / (1 - chance[task]) if chance[task] < 1 else 1.0
            if skill < thresholds.min_new_task_skill:
                reasons.append(f"task {task}: accuracy {accuracy:.3f} closes {skill:.3f} of the gap from chance "
                               f"{chance[task]:.3f} to 1 < required {thresholds.min_new_task_skill:.3f}")
    compared = compared_tasks(champion, trained)
    kept = {task: candidate.get(task) or [False] * len(champion[task]) for task in compared}  # a lost task: all wrong
    for task in compared:
        before, after = champion[task], kept[task]
        drop = _accuracy(before) - _accuracy(after)
        if drop > thresholds.max_old_task_drop:
            p_value = mcnemar_worse(before, after)
            if p_value < thresholds.significance:
                reasons.append(f"task {task}: accuracy fell {_accuracy(before):.3f} -> {_accuracy(after):.3f} "
                               f"(drop {drop:.3f} > allowed {thresholds.max_old_task_drop:.3f}, "
                               f"McNemar p={p_value:.3g} < {thresholds.significance})")
    if compared:
        candidate_aa = sum(_accuracy(kept[t]) for t in compared) / len(compared)
        champion_aa = sum(_accuracy(champion[t]) for t in compared) / len(compared)
        pooled = mcnemar_worse([c for t in compared for c in champion[t]], [c for t in compared for c in kept[t]])
        if candidate_aa < champion_aa - thresholds.max_aa_drop and pooled < thresholds.significance:
            reasons.append(f"AA on the champion's tasks {candidate_aa:.3f} is below the champion's {champion_aa:.3f} "
                           f"by more than {thresholds.max_aa_drop:.3f} (McNemar p={pooled:.3g} over their examples)")
    return GateDecision(not reasons, reasons)
