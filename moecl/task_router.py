"""Task-free inference: tell a text's task when a request does not carry one, or say it has none.

A text is described by the frozen backbone's last hidden state, mean-pooled over the text's own
tokens (no instruction, no adapters: the features never drift as experts train, and need no task to
compute). Each task keeps the count and mean of its training texts' features and a square root of
their scatter (at most one row per text: a few hundred rows, not d x d). A text goes to the task with
the highest linear-discriminant score under the pooled within-task covariance, shrunk toward a
multiple of the identity so a few hundred texts in hundreds of dimensions suffice.

Routing picks the best of the known tasks even for a text of none of them, so each task also keeps
an acceptance threshold: a quantile of the Mahalanobis distances of held-out texts of that task under
its own shrunk covariance. A text farther than that from the task it was routed to is refused. The
distance reads only that task's statistics, so the threshold stays valid when other tasks are added.
Only these statistics are stored, not the texts, and refitting one task replaces its statistics.
"""
from __future__ import annotations

import math

import torch

from .prompts import encode_text

SHRINKAGE = 0.1
MIN_HELD_OUT = 20  # fewer held-out texts than this give no usable quantile: the task refuses nothing
_GROUP_KEYS = ("count", "mean", "root", "threshold")


def padded_batches(model, texts: list[str], budget: int, batch_size: int):
    """(input_ids, mask) of `texts` encoded without instruction, `batch_size` at a time, right-padded."""
    pad = model.tokenizer.pad_token_id
    for start in range(0, len(texts), batch_size):
        ids = [encode_text(model.tokenizer, t, budget) for t in texts[start:start + batch_size]]
        width = max(map(len, ids))
        yield (torch.tensor([s + [pad] * (width - len(s)) for s in ids], device=model.device),
               torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=model.device))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) float64 mean of `hidden` over each row's unmasked tokens."""
    weight = mask.double().unsqueeze(-1)
    return (hidden.double() * weight).sum(1) / weight.sum(1)


@torch.no_grad()
def text_features(model, texts: list[str], budget: int, batch_size: int = 16) -> torch.Tensor:
    """(len(texts), hidden) mean-pooled last hidden states of the bare backbone over each text."""
    state = model.routing
    was_bypassed, state.bypass = state.bypass, True
    rows = []
    try:
        for input_ids, mask in padded_batches(model, texts, budget, batch_size):
            with model.autocast():
                hidden = model.hidden_states(input_ids, mask)
            rows.append(mean_pool(hidden, mask))
    finally:
        state.bypass = was_bypassed
    return torch.cat(rows).cpu()


def scatter_root(centred: torch.Tensor) -> torch.Tensor:
    """R (rank, dim) with R^T R = centred^T centred and orthogonal rows (R R^T diagonal): the
    singular values times the right singular vectors, rows of zero singular value dropped."""
    _, singular, right = torch.linalg.svd(centred, full_matrices=False)
    keep = singular > singular.max().clamp(min=1e-300) * 1e-12
    return singular[keep, None] * right[keep]


class TaskRouter:
    """Per-task feature statistics, the linear-discriminant rule that routes a text to a task, and
    the per-task distance threshold that refuses a text of no known task."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self._solved: tuple[torch.Tensor, torch.Tensor] | None = None  # the discriminant of these stats

    @property
    def tasks(self) -> list[str]:
        return list(self.stats)

    def fit(self, task: str, features: torch.Tensor, held_out: torch.Tensor | None = None,
            accept: float = 0.99) -> None:
        """Describe `task` by these texts' features (replacing what it had). With `held_out`
        features of other texts of the task (at least MIN_HELD_OUT), texts farther from it than the
        `accept` quantile of theirs are refused; without, the task accepts every text routed to it."""
        features = features.double()
        mean = features.mean(0)
        self.stats[task] = {"count": torch.tensor(float(len(features)), dtype=torch.float64), "mean": mean,
                            "root": scatter_root(features - mean),
                            "threshold": torch.tensor(math.inf, dtype=torch.float64)}
        if held_out is not None and len(held_out) >= MIN_HELD_OUT:
            distances = self.distance(task, held_out)
            self.stats[task]["threshold"] = torch.quantile(distances, accept).reshape(())
        self._solved = None

    def distance(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each feature row from `task`'s mean under the task's own
        covariance, shrunk like the pooled one. With Sigma = a R^T R + b I and R R^T = diag(s^2),
        Sigma^-1 = (I - R^T diag(1 / (b/a + s^2)) R) / b: no d x d matrix is formed."""
        stats = self.stats[task]
        root, count = stats["root"], stats["count"].item()
        dim = root.shape[1]
        a = (1 - SHRINKAGE) / max(count - 1, 1.0)
        b = SHRINKAGE * a / (1 - SHRINKAGE) * root.square().sum().clamp(min=1e-12) / dim
        y = features.double() - stats["mean"]
        projected = y @ root.T
        inside = (projected.square() / (b / a + root.square().sum(1))).sum(1)
        return (y.square().sum(1) - inside) / b

    def _discriminant(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (tasks, dim), bias (tasks,)) of the linear scores, solved once per set of statistics
        (a d x d solve: 0.1 s at d=4096, on every request otherwise)."""
        if self._solved is None:
            self._solved = self._solve()
        return self._solved

    def _solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        means = torch.stack([s["mean"] for s in self.stats.values()])
        total = sum(s["count"] for s in self.stats.values())
        roots = torch.cat([s["root"] for s in self.stats.values()])
        covariance = roots.T @ roots / max(total.item() - len(self.stats), 1.0)
        dim = covariance.shape[0]
        target = covariance.diagonal().mean().clamp(min=1e-12) * torch.eye(dim, dtype=covariance.dtype)
        covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * target
        weights = torch.linalg.solve(covariance, means.T).T
        return weights, -0.5 * (weights * means).sum(-1)

    def predict(self, features: torch.Tensor, refuse: bool = True) -> list[str | None]:
        """The task of each feature row; None where the row is farther from that task than its
        threshold (with `refuse`)."""
        if not self.stats:
            raise ValueError("the task router holds no task: train or load a model first")
        weights, bias = self._discriminant()
        features = features.double()
        routed = [self.tasks[i] for i in (features @ weights.T + bias).argmax(-1).tolist()]
        if not refuse:
            return routed
        result: list[str | None] = list(routed)
        for task in dict.fromkeys(routed):
            rows = [i for i, t in enumerate(routed) if t == task]
            far = self.distance(task, features[rows]) > self.stats[task]["threshold"]
            for i in (r for r, out in zip(rows, far.tolist()) if out):
                result[i] = None
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{task}.{key}": value for task, stats in self.stats.items() for key, value in stats.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Also reads statistics written before roots and thresholds (a d x d `scatter`, no threshold:
        that task accepts every text routed to it)."""
        tasks = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in tensors))
        stats = {}
        for task in tasks:
            mine = {key.rsplit(".", 1)[1]: value.double().cpu() for key, value in tensors.items()
                    if key.rsplit(".", 1)[0] == task}
            if "scatter" in mine and "root" not in mine:
                values, vectors = torch.linalg.eigh(mine.pop("scatter"))
                keep = values > values.max().clamp(min=1e-300) * 1e-12
                mine["root"] = values[keep].sqrt()[:, None] * vectors[:, keep].T
            mine.setdefault("threshold", torch.tensor(math.inf, dtype=torch.float64))
            missing = [f"{task}.{k}" for k in _GROUP_KEYS if k not in mine]
            if missing:
                raise ValueError(f"task-router statistics are missing {missing[:3]}")
            stats[task] = {k: mine[k] for k in _GROUP_KEYS}
        self.stats = stats
        self._solved = None
