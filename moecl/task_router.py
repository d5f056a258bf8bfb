"""Task-free inference: tell a text's task when a request does not carry one.

A text is described by the frozen backbone's last hidden state, mean-pooled over the text's own
tokens (no instruction, no adapters: the features never drift as experts train, and need no task to
compute). Each task keeps the count, mean and scatter of its training texts' features; a text goes
to the task with the highest linear-discriminant score under the pooled within-task covariance,
shrunk toward a multiple of the identity so a few hundred texts in hundreds of dimensions suffice.
Only these statistics are stored, not the texts, and refitting one task replaces its statistics.
"""
from __future__ import annotations

import torch

from .prompts import encode_text

SHRINKAGE = 0.1
_GROUP_KEYS = ("count", "mean", "scatter")


@torch.no_grad()
def text_features(model, texts: list[str], budget: int, batch_size: int = 16) -> torch.Tensor:
    """(len(texts), hidden) mean-pooled last hidden states of the bare backbone over each text."""
    state = model.routing
    was_bypassed, state.bypass = state.bypass, True
    rows = []
    try:
        for start in range(0, len(texts), batch_size):
            ids = [encode_text(model.tokenizer, t, budget) for t in texts[start:start + batch_size]]
            width = max(map(len, ids))
            pad = model.tokenizer.pad_token_id
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in ids], device=model.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=model.device)
            with model.autocast():
                hidden = model.hidden_states(input_ids, mask)
            hidden, mask = hidden.double(), mask.double()
            rows.append((hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))
    finally:
        state.bypass = was_bypassed
    return torch.cat(rows).cpu()


class TaskRouter:
    """Per-task feature statistics and the linear-discriminant rule that routes a text to a task."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self._solved: tuple[torch.Tensor, torch.Tensor] | None = None  # the discriminant of these stats

    @property
    def tasks(self) -> list[str]:
        return list(self.stats)

    def fit(self, task: str, features: torch.Tensor) -> None:
        """Describe `task` by these texts' features (replacing what it had)."""
        features = features.double()
        mean = features.mean(0)
        centred = features - mean
        self.stats[task] = {"count": torch.tensor(float(len(features)), dtype=torch.float64), "mean": mean,
                            "scatter": centred.T @ centred}
        self._solved = None

    def _discriminant(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (tasks, dim), bias (tasks,)) of the linear scores, solved once per set of statistics
        (a d x d solve: 0.1 s at d=4096, on every request otherwise)."""
        if self._solved is None:
            self._solved = self._solve()
        return self._solved

    def _solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        means = torch.stack([s["mean"] for s in self.stats.values()])
        total = sum(s["count"] for s in self.stats.values())
        scatter = sum(s["scatter"] for s in self.stats.values())
        covariance = scatter / max(total.item() - len(self.stats), 1.0)
        dim = covariance.shape[0]
        target = covariance.diagonal().mean().clamp(min=1e-12) * torch.eye(dim, dtype=covariance.dtype)
        covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * target
        weights = torch.linalg.solve(covariance, means.T).T
        return weights, -0.5 * (weights * means).sum(-1)

    def predict(self, features: torch.Tensor) -> list[str]:
        if not self.stats:
            raise ValueError("the task router holds no task: train or load a model first")
        weights, bias = self._discriminant()
        scores = features.double() @ weights.T + bias
        return [self.tasks[i] for i in scores.argmax(-1).tolist()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{task}.{key}": value for task, stats in self.stats.items() for key, value in stats.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        tasks = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in tensors))
        missing = [f"{t}.{k}" for t in tasks for k in _GROUP_KEYS if f"{t}.{k}" not in tensors]
        if missing:
            raise ValueError(f"task-router statistics are missing {missing[:3]}")
        self.stats = {t: {k: tensors[f"{t}.{k}"].double().cpu() for k in _GROUP_KEYS} for t in tasks}
        self._solved = None
