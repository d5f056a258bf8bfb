"""The task-free router's discriminant: solved once per set of statistics, and redone after a refit."""
from __future__ import annotations

import torch

from moecl.task_router import TaskRouter


def _cloud(centre: float, n: int = 60, dim: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return centre + torch.randn(n, dim, generator=generator, dtype=torch.float64)


def test_the_discriminant_is_solved_once_and_again_after_any_change(monkeypatch):
    router = TaskRouter()
    router.fit("a", _cloud(-3.0, seed=1))
    router.fit("b", _cloud(3.0, seed=2))
    solves = []
    solve = TaskRouter._solve
    monkeypatch.setattr(TaskRouter, "_solve", lambda self: solves.append(1) or solve(self))
    probe = torch.stack([torch.full((8,), -3.0), torch.full((8,), 3.0)]).double()

    assert router.predict(probe) == ["a", "b"] and router.predict(probe) == ["a", "b"]
    assert len(solves) == 1
    router.fit("b", _cloud(-6.0, seed=3))  # b's texts moved: the cached rule must not be used
    assert router.predict(torch.full((1, 8), -6.0).double()) == ["b"] and len(solves) == 2
    reloaded = TaskRouter()
    reloaded.load_state_dict(router.state_dict())
    assert reloaded.predict(probe) == router.predict(probe)
