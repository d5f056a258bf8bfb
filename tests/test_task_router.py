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


def _reference_scores(clouds: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """The shrunk linear discriminant written out with full d x d scatters, as the router did before."""
    means = torch.stack([c.mean(0) for c in clouds.values()])
    scatter = sum((c - c.mean(0)).T @ (c - c.mean(0)) for c in clouds.values())
    covariance = scatter / (sum(len(c) for c in clouds.values()) - len(clouds))
    covariance = 0.9 * covariance + 0.1 * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=torch.float64)
    weights = torch.linalg.solve(covariance, means.T).T
    return features @ weights.T - 0.5 * (weights * means).sum(-1)


def test_routing_from_scatter_roots_is_the_full_scatter_discriminant_with_fewer_numbers():
    dim = 40
    clouds = {"a": _cloud(-1.0, n=12, dim=dim, seed=1), "b": _cloud(1.0, n=12, dim=dim, seed=2),
              "c": _cloud(0.0, n=12, dim=dim, seed=3)}
    router = TaskRouter()
    for task, cloud in clouds.items():
        router.fit(task, cloud)
    probe = _cloud(0.3, n=50, dim=dim, seed=4)
    weights, bias = router._discriminant()
    assert torch.allclose(probe @ weights.T + bias, _reference_scores(clouds, probe), rtol=1e-9, atol=1e-9)
    # 12 texts in 40 dimensions: 11 rows of 40 numbers a task, not a 40 x 40 scatter.
    assert all(s["root"].shape == (11, dim) for s in router.stats.values())


def test_the_distance_is_the_mahalanobis_distance_under_the_tasks_own_shrunk_covariance():
    cloud, probe = _cloud(2.0, n=30, dim=10, seed=5), _cloud(0.0, n=7, dim=10, seed=6)
    router = TaskRouter()
    router.fit("a", cloud)
    centred = cloud - cloud.mean(0)
    covariance = centred.T @ centred / (len(cloud) - 1)
    covariance = 0.9 * covariance + 0.1 * covariance.diagonal().mean() * torch.eye(10, dtype=torch.float64)
    y = probe - cloud.mean(0)
    expected = (y * torch.linalg.solve(covariance, y.T).T).sum(1)
    assert torch.allclose(router.distance("a", probe), expected, rtol=1e-9)


def test_texts_of_no_known_task_are_refused_and_known_ones_accepted():
    dim, known = 16, {"a": -2.0, "b": 2.0}
    router = TaskRouter()
    for seed, (task, centre) in enumerate(known.items()):
        router.fit(task, _cloud(centre, n=200, dim=dim, seed=seed), _cloud(centre, n=100, dim=dim, seed=10 + seed), 0.99)
    fresh = {task: _cloud(centre, n=300, dim=dim, seed=20 + i) for i, (task, centre) in enumerate(known.items())}
    for task, features in fresh.items():
        routed = router.predict(features)
        assert routed.count(task) / len(routed) >= 0.95, (task, routed.count(None))
    stranger = _cloud(0.0, n=300, dim=dim, seed=30) + 6 * torch.eye(dim, dtype=torch.float64)[0]
    assert router.predict(stranger).count(None) / len(stranger) >= 0.95
    assert None not in router.predict(stranger, refuse=False)


def test_too_few_held_out_texts_set_no_threshold():
    router = TaskRouter()
    router.fit("a", _cloud(0.0, seed=1), _cloud(0.0, n=5, seed=2))
    assert router.stats["a"]["threshold"].item() == float("inf")
    assert None not in router.predict(_cloud(50.0, n=10, seed=3))


def test_statistics_written_as_full_scatters_still_route_and_refuse_nothing():
    clouds = {"a": _cloud(-3.0, seed=1), "b": _cloud(3.0, seed=2)}
    legacy = {}
    for task, cloud in clouds.items():
        centred = cloud - cloud.mean(0)
        legacy |= {f"{task}.count": torch.tensor(float(len(cloud)), dtype=torch.float64), f"{task}.mean": cloud.mean(0),
                   f"{task}.scatter": centred.T @ centred}
    router = TaskRouter()
    router.load_state_dict(legacy)
    probe = _cloud(0.5, n=40, seed=4)
    weights, bias = router._discriminant()
    assert torch.allclose(probe @ weights.T + bias, _reference_scores(clouds, probe), rtol=1e-8, atol=1e-8)
    assert None not in router.predict(_cloud(80.0, n=10, seed=5))


def test_a_texts_layout_is_the_field_names_that_open_its_lines():
    from moecl.task_router import text_layout

    assert text_layout("Title: Dow falls\nText: Stocks fell: a lot.") == "Title|Text"
    assert text_layout("Question text: why?\nBest Answer: because") == "Question text|Best Answer"
    assert text_layout("the food was great: ask for Tim\nupdate: closed now") == ""  # free text


def _templated(layout: str, n: int) -> list[str]:
    return ["\n".join(f"{field}: words {i}" for field in layout.split("|")) if layout else f"words {i}" for i in range(n)]


def test_a_text_laid_out_unlike_its_routed_task_is_refused_however_close_its_content():
    router = TaskRouter()
    for seed, (task, layout) in enumerate({"news": "Title|Text", "reviews": ""}.items()):
        router.fit(task, _cloud(4.0 * seed, n=100, seed=seed), _cloud(4.0 * seed, n=40, seed=10 + seed), 0.99)
        router.fit_layouts(task, _templated(layout, 100), _templated(layout, 40))
    typical = torch.stack([torch.full((8,), 0.0), torch.full((8,), 4.0)]).double()  # each task's very centre
    assert router.predict(typical, layouts=["Title|Text", ""]) == ["news", "reviews"]
    assert router.predict(typical, layouts=["Text", "Title|Text"]) == [None, None]  # fields, but foreign ones
    assert router.predict(typical, layouts=["", ""]) == ["news", "reviews"]  # no fields named: the content decides
    assert router.predict(typical) == ["news", "reviews"]  # no layouts given: the distance alone
    routed, strange = router.strangeness(typical, layouts=["Title|Text", "Title|Question"])
    assert routed == ["news", "reviews"] and strange[0] < 1 and strange[1] == float("inf")

    reloaded = TaskRouter()
    reloaded.load_state_dict(router.state_dict())  # the layouts travel with the statistics
    assert reloaded.layouts == {"news": ["Title|Text"], "reviews": [""]}
    assert reloaded.predict(typical, layouts=["Text", "Title|Text"]) == [None, None]


def test_a_task_of_mixed_layouts_checks_none_and_a_refit_replaces_its_layouts():
    router = TaskRouter()
    router.fit("a", _cloud(0.0))
    mixed = _templated("Title|Text", 30) + _templated("", 10)
    router.fit_layouts("a", _templated("Title|Text", 50), mixed)  # a quarter of held-out texts in another layout
    assert "a" not in router.layouts
    router.fit_layouts("a", _templated("Title|Text", 50), _templated("Title|Text", 30))
    assert router.layouts["a"] == ["Title|Text"]
    router.fit_layouts("a", _templated("Title|Text", 50), _templated("Title|Text", 5))  # too few to tell
    assert "a" not in router.layouts and router.predict(torch.zeros(1, 8).double(), layouts=["Other"]) == ["a"]
