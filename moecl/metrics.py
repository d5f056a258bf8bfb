"""Continual-learning metrics over the accuracy matrix R (R[i][j]: accuracy on task j after task i).

Rows are lower-triangular: row i holds tasks 0..i. All values are fractions in [0, 1]; a cell is
None where that task was not evaluated after that stage (`eval.every_stage: false` evaluates only the
diagonal and the last row, all that AA, BWT and FWT need).
- AA: mean of the last row.
- BWT: mean over j < T-1 of R[T-1][j] - R[j][j] (negative = forgetting).
- forgetting[j]: best accuracy task j ever had before the end minus its final accuracy.
- FWT: mean over j >= 1 of R'[j-1][j] - b[j], where R'[j-1][j] is task j's accuracy just before it
  is trained and b[j] the untrained backbone's accuracy on it.

A task trained again (its data changed) is a later stage of its own: a row of R whose columns are
still the model's tasks. For it, "just trained" means after its last training, so BWT and forgetting
count only what the stages after that cost it, and a retraining adds no FWT term.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

# Two-sided 95% Student t quantiles by degrees of freedom (n - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of its 95% t interval over seeds (ci95 None for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None}
    return {"mean": mean, "ci95": _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))}


def average_accuracy(matrix: list[list[float]]) -> float:
    last = matrix[-1]
    return sum(last) / len(last)


def _last_trained(tasks: list[str], stages: list[list[str]]) -> dict[str, int]:
    """Per task, the last stage that trained it."""
    return {task: i for i, trained in enumerate(stages) for task in trained if task in tasks}


def backward_transfer(matrix: list[list[float]], tasks: list[str], stages: list[list[str]]) -> float | None:
    """Mean over the tasks the last stage did not train of final minus just-trained accuracy, where
    just-trained is the accuracy after the task's *last* training (a retrained task is measured from
    its retraining, so BWT only counts what later stages cost it)."""
    last = _last_trained(tasks, stages)
    final_stage = len(matrix) - 1
    earlier = [(j, last[t]) for j, t in enumerate(tasks) if last.get(t, final_stage) < final_stage]
    if not earlier:
        return None
    return sum(matrix[-1][j] - matrix[i][j] for j, i in earlier) / len(earlier)


def forgetting(matrix: list[list[float]], tasks: list[str], stages: list[list[str]]) -> dict[str, float]:
    """Per task the last stage did not train: its best accuracy from its last training until before
    the end, minus its final accuracy."""
    last = _last_trained(tasks, stages)
    final_stage = len(matrix) - 1
    return {t: max(matrix[i][j] for i in range(last[t], final_stage) if matrix[i][j] is not None) - matrix[-1][j]
            for j, t in enumerate(tasks) if last.get(t, final_stage) < final_stage}


def forward_transfer(before_training: list[float], baseline: list[float], tasks: list[str],
                     stages: list[list[str]]) -> float | None:
    """Over the stages that introduce a task after the first (a retraining is no transfer):
    accuracy just before training minus the untrained backbone's, on that task."""
    seen, pairs = set(), []
    for i, trained in enumerate(stages):
        new = [t for t in trained if t not in seen]
        if i > 0 and len(new) == 1 and i < len(before_training):
            pairs.append(before_training[i] - baseline[tasks.index(new[0])])
        seen.update(trained)
    return sum(pairs) / len(pairs) if pairs else None


def stage_tasks(training: list[dict], matrix: list) -> list[list[str]] | None:
    """The tasks each row of the accuracy matrix trained, from the trainer's per-stage records."""
    return [s["stage"].split("+") for s in training] if len(training) == len(matrix) else None


def summarise(tasks: list[str], matrix: list[list[float]], before_training: list[float] | None = None,
              baseline: list[float] | None = None, stages: list[list[str]] | None = None) -> dict:
    """`stages`: the tasks each row's stage trained (default: one task per stage, in `tasks` order;
    a task trained again appears in a later stage too)."""
    stages = stages or [[t] for t in tasks[: len(matrix)]]
    if len(matrix) == 1 and len(stages[0]) > 1:  # multi-task learning: one stage, no transfer to measure
        stages = [list(tasks)]
    summary = {
        "tasks": tasks,
        "accuracy_matrix": matrix,
        "aa": average_accuracy(matrix),
        "bwt": backward_transfer(matrix, tasks, stages),
        "forgetting": forgetting(matrix, tasks, stages),
        "fwt": None,
    }
    if before_training is not None and baseline is not None:
        summary.update(before_training=before_training, baseline=baseline,
                       fwt=forward_transfer(before_training, baseline, tasks, stages))
    return summary


def plot_heatmap(tasks: list[str], matrix: list[list[float]], path: Path, title: str,
                 stages: list[str] | None = None) -> None:
    """Accuracy matrix as a heatmap PNG, a row per stage (named by `stages`, default: the tasks in
    order, which fits one new task per stage); cells not evaluated stay blank."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(matrix), len(tasks)), np.nan)
    for i, row in enumerate(matrix):
        grid[i, : len(row)] = [np.nan if v is None else v for v in row]
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 0.9 * len(matrix) + 1.5))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    if not stages:
        stages = (["all"] if len(matrix) == 1 else tasks[: len(matrix)] if len(matrix) <= len(tasks)
                  else [f"stage {i}" for i in range(1, len(matrix) + 1)])  # a task trained again, unnamed
    ax.set_yticks(range(len(matrix)), [f"after {name}" for name in stages])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is None:
                continue
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", color="w" if value < 0.6 else "k")
    ax.set_xlabel("evaluated task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def automation_coverage(margins: list[float], correct: list[bool], precision: float) -> tuple[float, float]:
    """The paper's business metric: the largest share of items that can be answered automatically
    with at least `precision` of them right, taking the most confident first (by label margin).
    Returns (coverage, the margin an answer needs). The threshold is read off the same examples it
    is reported on, so it is an optimistic estimate of what a fresh sample would give."""
    ranked = sorted(zip(margins, correct), key=lambda pair: -pair[0])
    best, threshold, right = 0, float("inf"), 0
    for count, (margin, ok) in enumerate(ranked, start=1):
        right += ok
        if right / count >= precision:
            best, threshold = count, margin
    return (best / len(ranked) if ranked else 0.0), threshold
