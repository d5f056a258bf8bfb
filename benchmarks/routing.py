"""Task-free routing on the five MTL5 tasks, and refusal of texts of a task the model never learned.

The router reads only the frozen backbone, so no training is needed and the numbers hold for every
trained model of that backbone. Each task's router texts are drawn as the trainer draws them
(`router_texts`: fit texts, then other training texts that set its acceptance distance); features
are computed once. Two measurements:
- all five tasks known: where each task's test texts go (a task, or refused);
- leave one out: the router knows four tasks; the share of the fifth task's test texts it refuses,
  by the distance alone and with the layout check too (moecl.task_router: a text laid out unlike the
  task it is routed to is refused), and the share of the four known tasks' test texts it routes right
  (refusals count as wrong). Also
  which known tasks the fifth task's texts are routed to, and whether any threshold could do better:
  a text's strangeness (TaskRouter.strangeness) is its distance from the task it is routed to over that
  task's threshold, infinite for a foreign layout (it is refused above 1); the separability is the chance that a text of the fifth task is stranger than a
  known task's text (AUROC: 0.5 is blind), and the ceiling the share refused when one factor on every
  threshold is chosen on these test texts, the highest that keeps every known task routed right 95%.

    python benchmarks/routing.py [--fit-per-task 256] [--calibrate-per-task 64] [--accept 0.995]
                                 [--cache runs/routing/features.pt]

Prints tables, writes benchmarks/results/routing.json.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from moecl.config import config_from_dict
from moecl.task_router import ACCEPT, TaskRouter, text_features, text_layout
from moecl.trainer import Trainer, router_texts

from precision import cpu  # noqa: E402  (benchmarks/ is the script's folder)

TASKS = ("dbpedia", "amazon", "yahoo", "agnews", "yelp")
REFUSED = "refused"


def fitted(tasks, features, accept: float, layouts: bool = True) -> TaskRouter:
    """The router of `tasks` as the trainer fits it (with `layouts`, the layout check too)."""
    router = TaskRouter()
    for task in tasks:
        router.fit(task, features[task]["fit"], features[task]["held"], accept)
        if layouts:
            router.fit_layouts(task, features[task]["texts"]["fit"], features[task]["texts"]["held"], accept)
    return router


def strangeness(router: TaskRouter, features: dict, split: str = "test") -> tuple[list[str], torch.Tensor]:
    """TaskRouter.strangeness of one task's texts of `split`, their layouts given."""
    return router.strangeness(features[split], [text_layout(t) for t in features["texts"][split]])


def text_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the texts (shared with routing_rules.py)."""
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mtl5"))
    parser.add_argument("--fit-per-task", type=int, default=256)
    parser.add_argument("--calibrate-per-task", type=int, default=64)
    parser.add_argument("--test-per-label", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--cache", type=Path, help="keep the features here, so a re-run skips the backbone")


def featurise(args, describe) -> dict[str, dict]:
    """Per task, `describe(model, texts)` of its fit, held-out and test texts, drawn as the trainer
    draws them, and the texts themselves (under "texts")."""
    cfg = config_from_dict({
        "backbone": "smollm2-135m-instruct", "method": "moecl",
        "train": {"max_length": args.max_length}, "router": {"fit_per_task": args.fit_per_task},
        "eval": {"max_per_label": args.test_per_label, "batch_size": 16},
        "tasks": [{"name": t, "data": str(Path(args.data) / t)} for t in TASKS],
    }, source="routing")
    trainer = Trainer(cfg, "unused")
    features = {}
    for task in trainer.tasks:
        fit, held = router_texts(task.train, args.fit_per_task, args.calibrate_per_task, None, 0)
        test = [e.text for e in trainer.test_sets[task.name]]
        computed = describe(trainer.model, fit + held + test)
        features[task.name] = {"fit": computed[: len(fit)], "held": computed[len(fit): len(fit) + len(held)],
                               "test": computed[len(fit) + len(held):],
                               "texts": {"fit": fit, "held": held, "test": test}}
    return features


def cached_features(args, describe, kind: str) -> dict[str, dict]:
    """featurise(args, describe), read from args.cache where it holds features of this `kind` for
    these texts, else computed (and written there when args.cache is set)."""
    key = {k: str(getattr(args, k)) for k in ("data", "fit_per_task", "calibrate_per_task", "test_per_label",
                                              "max_length")} | {"kind": kind}
    if args.cache and args.cache.is_file():
        stored = torch.load(args.cache)
        if stored.get("key") == key:
            return stored["features"]
    features = featurise(args, describe)
    if args.cache:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "features": features}, args.cache)
    return features


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counted half."""
    above = (positive[:, None] > negative[None, :]).double() + 0.5 * (positive[:, None] == negative[None, :]).double()
    return above.mean().item()


def leave_one_out(features, stranger: str, accept: float, layouts: bool = True, keep: float = 0.95) -> dict:
    """The router of the other tasks against `stranger`'s test texts: refused, where they go, the
    known tasks routed right, separability and the ceiling (see the module's docstring)."""
    known = [t for t in TASKS if t != stranger]
    router = fitted(known, features, accept, layouts)
    routed, strange = strangeness(router, features[stranger])
    own = {}  # known task -> (its texts routed to it, their strangeness)
    for t in known:
        went, ratio = strangeness(router, features[t])
        own[t] = (torch.tensor([w == t for w in went]), ratio)

    def right_at(factor: float) -> dict[str, float]:
        return {t: (mine & (ratio <= factor)).double().mean().item() for t, (mine, ratio) in own.items()}

    right = right_at(1.0)
    ceiling = 0.0
    for factor in torch.cat([strange, *(r for _, r in own.values())]).unique().tolist():  # ascending
        if min(right_at(factor).values()) >= keep:  # the first factor that keeps every known task refuses most
            ceiling = (strange > factor).double().mean().item()
            break
    return {"refused": (strange > 1).double().mean().item(), "routed_to": {t: routed.count(t) for t in known},
            "layouts_checked": sorted(router.layouts),
            "known_routed_right": right, "known_routed_right_min": min(right.values()),
            "separability": auroc(strange, torch.cat([r for _, r in own.values()])), "ceiling": ceiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    text_arguments(parser)
    parser.add_argument("--accept", type=float, default=ACCEPT, help="router.accept_quantile")
    parser.add_argument("--json", default="benchmarks/results/routing.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    features = cached_features(args, lambda model, texts: text_features(model, texts, args.max_length, 16),
                               "text_features+texts")

    router = fitted(TASKS, features, args.accept)
    confusion = {}
    for task in TASKS:
        layouts = [text_layout(t) for t in features[task]["texts"]["test"]]
        routed = [r or REFUSED for r in router.predict(features[task]["test"], layouts=layouts)]
        confusion[task] = {t: routed.count(t) for t in (*TASKS, REFUSED)}
    accuracy = {t: confusion[t][t] / sum(confusion[t].values()) for t in TASKS}

    unseen = {stranger: leave_one_out(features, stranger, args.accept) for stranger in TASKS}
    by_distance = {stranger: leave_one_out(features, stranger, args.accept, layouts=False) for stranger in TASKS}

    name, _ = cpu()
    print(f"\nrouter fit on {args.fit_per_task} training texts per task, acceptance distance from "
          f"{args.calibrate_per_task} others at the {args.accept} quantile; test: up to {args.test_per_label} per label ({name})\n")
    print("| true task | routed right | " + " | ".join(f"→ {t}" for t in (*TASKS, REFUSED)) + " |\n|---|---|"
          + "---|" * (len(TASKS) + 1))
    for t in TASKS:
        print(f"| {t} | {100 * accuracy[t]:.1f} | " + " | ".join(str(confusion[t][u]) for u in (*TASKS, REFUSED)) + " |")
    print("\n| task never learned | refused: distance + layout (distance alone) | known tasks routed right, "
          "lowest (distance alone) | separability (AUROC) | ceiling | routed to (before refusal) |\n|---|---|---|---|---|---|")
    for t, r in unseen.items():
        alone = by_distance[t]
        where = ", ".join(f"{u} {n}" for u, n in sorted(r["routed_to"].items(), key=lambda kv: -kv[1]) if n)
        print(f"| {t} | {100 * r['refused']:.1f} ({100 * alone['refused']:.1f}) | {100 * r['known_routed_right_min']:.1f} "
              f"({100 * alone['known_routed_right_min']:.1f}) | {r['separability']:.3f} | {100 * r['ceiling']:.1f} | {where} |")
    counts = {t: len(features[t]["test"]) for t in TASKS}
    mean_refused, pooled_refused = {}, {}
    for rule, runs in (("distance + layout", unseen), ("distance alone", by_distance)):
        mean_refused[rule] = sum(r["refused"] for r in runs.values()) / len(runs)
        pooled_refused[rule] = sum(r["refused"] * counts[t] for t, r in runs.items()) / sum(counts.values())
    for label, value in (("mean over tasks", mean_refused), ("pooled over texts", pooled_refused)):
        print(f"| **{label}** | {100 * value['distance + layout']:.1f} ({100 * value['distance alone']:.1f}) "
              f"| {100 * min(r['known_routed_right_min'] for r in unseen.values()):.1f} | | | |")
    Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cpu": name, "accuracy": accuracy, "confusion": confusion,
                                           "unseen": unseen, "unseen_distance_alone": by_distance,
                                           "mean_refused": mean_refused, "pooled_refused": pooled_refused}, indent=2))


if __name__ == "__main__":
    main()
