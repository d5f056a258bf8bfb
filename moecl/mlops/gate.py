"""The promotion gate: a candidate replaces the champion only if it learned what is new without
giving up what the champion could do.

A drop on an old task counts only when it is both larger than allowed and real: candidate and
champion answer the same test examples, so McNemar's exact test on the examples where exactly one
of them is right says whether the candidate is worse beyond chance. A task evaluated on fewer
than `min_eval_examples` examples cannot be judged at all, and blocks the promotion.
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


def _accuracy(correct: list[bool]) -> float:
    return sum(correct) / len(correct)


def decide(candidate: dict[str, list[bool]], champion: dict[str, list[bool]] | None, trained: list[str],
           thresholds: GateThresholds, automation: dict[str, float] | None = None) -> GateDecision:
    """`candidate`/`champion`: per task, whether each test example was answered right (the same
    examples in the same order for both); `trained`: the tasks this run added or changed;
    `automation`: per task, the candidate's share of items decidable alone. Without a champion only
    the size, new-task and automation rules apply."""
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
    if champion:
        for task, before in champion.items():
            after = candidate.get(task, [False] * len(before))
            drop = _accuracy(before) - _accuracy(after)
            if drop > thresholds.max_old_task_drop:
                p_value = mcnemar_worse(before, after)
                if p_value < thresholds.significance:
                    reasons.append(f"task {task}: accuracy fell {_accuracy(before):.3f} -> {_accuracy(after):.3f} "
                                   f"(drop {drop:.3f} > allowed {thresholds.max_old_task_drop:.3f}, "
                                   f"McNemar p={p_value:.3g} < {thresholds.significance})")
        candidate_aa = sum(map(_accuracy, candidate.values())) / len(candidate)
        champion_aa = sum(map(_accuracy, champion.values())) / len(champion)
        if candidate_aa < champion_aa - thresholds.max_aa_drop:
            reasons.append(f"AA {candidate_aa:.3f} is below the champion's {champion_aa:.3f} "
                           f"by more than {thresholds.max_aa_drop:.3f}")
    return GateDecision(not reasons, reasons)
