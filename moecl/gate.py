"""The promotion gate: a candidate replaces the champion only if it learned what is new without
giving up what the champion could do."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateThresholds:
    min_new_task_accuracy: float = 0.25  # every new or changed task must reach this accuracy
    max_old_task_drop: float = 0.05  # no champion task may lose more than this (absolute accuracy)
    max_aa_drop: float = 0.05  # candidate AA may sit at most this far below the champion's AA


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]


def decide(candidate: dict[str, float], champion: dict[str, float] | None, trained: list[str],
           thresholds: GateThresholds) -> GateDecision:
    """`candidate`/`champion`: accuracy per task on the same test data; `trained`: the tasks this
    run added or changed. Without a champion only the new-task threshold applies."""
    reasons = []
    for task in trained:
        if candidate[task] < thresholds.min_new_task_accuracy:
            reasons.append(f"task {task}: accuracy {candidate[task]:.3f} < required {thresholds.min_new_task_accuracy:.3f}")
    if champion:
        for task, before in champion.items():
            drop = before - candidate.get(task, 0.0)
            if drop > thresholds.max_old_task_drop:
                reasons.append(f"task {task}: accuracy fell {before:.3f} -> {candidate.get(task, 0.0):.3f} "
                               f"(drop {drop:.3f} > allowed {thresholds.max_old_task_drop:.3f})")
        candidate_aa = sum(candidate.values()) / len(candidate)
        champion_aa = sum(champion.values()) / len(champion)
        if candidate_aa < champion_aa - thresholds.max_aa_drop:
            reasons.append(f"AA {candidate_aa:.3f} is below the champion's {champion_aa:.3f} "
                           f"by more than {thresholds.max_aa_drop:.3f}")
    return GateDecision(not reasons, reasons)
