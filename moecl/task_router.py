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

Mean-pooled content cannot tell every new task apart: a product review reads much like a restaurant
review or a news story. Templated inputs carry a second, sharper signal: their layout, the field
names that open their lines ("Title:", "Question:", ...). A task whose held-out texts all show a layout
among its describing texts' (at least the acceptance quantile of them) keeps that set, and a text that
names fields, but not in one of those layouts, is refused when routed to it. A text that names no
field (a user who left the template out) is judged by its content alone; a task of mixed layouts
checks none. The layouts kept are stored beside the statistics.
"""
from __future__ import annotations

import json
import math
import re

import torch

from .prompts import encode_text

SHRINKAGE = 0.1
MIN_HELD_OUT = 20  # fewer held-out texts than this give no usable quantile: the task refuses nothing
# The share of a task's held-out texts it accepts (router.accept_quantile). 0.995, not 0.99: on the five
# MTL5 tasks 0.99 left one known task routed right 94.8% of the time, 0.995 every one at 96.8% or more
# while unseen tasks' texts are still refused 82.4% of the time (benchmarks/routing.py, README).
ACCEPT = 0.995
_GROUP_KEYS = ("count", "mean", "root", "threshold")
_FIELD = re.compile(r"^([A-Z][A-Za-z]*(?: [A-Za-z]+){0,3}):", re.MULTILINE)  # "Title:", "Question text:" at a line's start


def text_layout(text: str) -> str:
    """The field names that open the text's lines, in order ("Title|Text"); "" for free text."""
    return "|".join(_FIELD.findall(text))


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


def route(model, texts: list[str], budget: int, batch_size: int = 16) -> list[str | None]:
    """The task of each text by the model's task-free router; None for a text of no known task."""
    features = text_features(model, texts, budget, batch_size)
    return model.task_router.predict(features, layouts=[text_layout(t) for t in texts])


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
        self.layouts: dict[str, list[str]] = {}  # per task that checks layouts: the ones it accepts
        self._solved: tuple[torch.Tensor, torch.Tensor] | None = None  # the discriminant of these stats

    @property
    def tasks(self) -> list[str]:
        return list(self.stats)

    def fit(self, task: str, features: torch.Tensor, held_out: torch.Tensor | None = None,
            accept: float = ACCEPT) -> None:
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

    def fit_layouts(self, task: str, texts: list[str], held_out: list[str], accept: float = ACCEPT) -> None:
        """Keep the layouts of `task`'s describing texts if at least `accept` of its held-out texts (at least
        MIN_HELD_OUT) show one of them: its inputs follow a template, and a text of another layout is not
        the task's. Otherwise the task checks no layout."""
        known = sorted({text_layout(t) for t in texts})
        covered = sum(text_layout(t) in known for t in held_out)
        if len(held_out) >= MIN_HELD_OUT and covered >= accept * len(held_out):
            self.layouts[task] = known
        else:
            self.layouts.pop(task, None)

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

    def _route(self, features: torch.Tensor) -> list[str]:
        if not self.stats:
            raise ValueError("the task router holds no task: train or load a model first")
        weights, bias = self._discriminant()
        return [self.tasks[i] for i in (features.double() @ weights.T + bias).argmax(-1).tolist()]

    def strangeness(self, features: torch.Tensor, layouts: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """(the task each row is routed to, how far out it lies for that task: its distance over the
        task's threshold, infinite where its layout (given `layouts`) names fields but is not one the task
        keeps). A row stranger than 1 is of no known task."""
        routed = self._route(features)
        strange = torch.zeros(len(routed), dtype=torch.float64)
        for task in dict.fromkeys(routed):
            rows = [i for i, t in enumerate(routed) if t == task]
            strange[rows] = self.distance(task, features[rows].double()) / self.stats[task]["threshold"]
            if layouts is not None and task in self.layouts:
                foreign = [i for i in rows if layouts[i] and layouts[i] not in self.layouts[task]]
                strange[foreign] = math.inf
        return routed, strange

    def predict(self, features: torch.Tensor, refuse: bool = True, layouts: list[str] | None = None) -> list[str | None]:
        """The task of each feature row; None where the row is of no known task (with `refuse`; the
        layout check with the rows' `layouts`)."""
        if not refuse:
            return self._route(features)
        routed, strange = self.strangeness(features, layouts)
        return [None if s > 1 else t for t, s in zip(routed, strange.tolist())]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors): a task's accepted layouts as the UTF-8 bytes of a JSON list."""
        tensors = {f"{task}.{key}": value for task, stats in self.stats.items() for key, value in stats.items()}
        for task, layouts in self.layouts.items():
            tensors[f"{task}.layouts"] = torch.tensor(list(json.dumps(layouts).encode()), dtype=torch.uint8)
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Also reads statistics written before roots, thresholds and layouts (a d x d `scatter`, no
        threshold: that task accepts every text routed to it; no layouts: it checks none)."""
        tasks = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in tensors))
        stats, layouts = {}, {}
        for task in tasks:
            mine = {key.rsplit(".", 1)[1]: value.cpu() for key, value in tensors.items()
                    if key.rsplit(".", 1)[0] == task}
            if "layouts" in mine:
                layouts[task] = json.loads(bytes(mine.pop("layouts").tolist()).decode())
            mine = {key: value.double() for key, value in mine.items()}
            if "scatter" in mine and "root" not in mine:
                values, vectors = torch.linalg.eigh(mine.pop("scatter"))
                keep = values > values.max().clamp(min=1e-300) * 1e-12
                mine["root"] = values[keep].sqrt()[:, None] * vectors[:, keep].T
            mine.setdefault("threshold", torch.tensor(math.inf, dtype=torch.float64))
            missing = [f"{task}.{k}" for k in _GROUP_KEYS if k not in mine]
            if missing:
                raise ValueError(f"task-router statistics are missing {missing[:3]}")
            stats[task] = {k: mine[k] for k in _GROUP_KEYS}
        self.stats, self.layouts = stats, layouts
        self._solved = None
