"""Task-free routing on the five MTL5 tasks, and refusal of texts of a task the model never learned.

The router reads only the frozen backbone, so no training is needed and the numbers hold for every
trained model of that backbone. Each task's router texts are drawn as the trainer draws them
(`router_texts`: fit texts, then other training texts that set its acceptance distance); features
are computed once. Two measurements:
- all five tasks known: where each task's test texts go (a task, or refused);
- leave one out: the router knows four tasks; the share of the fifth task's test texts it refuses,
  and the share of the four known tasks' test texts it routes right (refusals count as wrong).

    python benchmarks/routing.py [--fit-per-task 256] [--calibrate-per-task 64] [--accept 0.99]

Prints tables, writes benchmarks/results/routing.json.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from moecl.config import config_from_dict
from moecl.task_router import TaskRouter, text_features
from moecl.trainer import Trainer, router_texts

from precision import cpu  # noqa: E402  (benchmarks/ is the script's folder)

TASKS = ("dbpedia", "amazon", "yahoo", "agnews", "yelp")
REFUSED = "refused"


def fitted(tasks, features, accept: float) -> TaskRouter:
    router = TaskRouter()
    for task in tasks:
        router.fit(task, features[task]["fit"], features[task]["held"], accept)
    return router


def text_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the texts (shared with routing_rules.py)."""
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mtl5"))
    parser.add_argument("--fit-per-task", type=int, default=256)
    parser.add_argument("--calibrate-per-task", type=int, default=64)
    parser.add_argument("--test-per-label", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=96)


def featurise(args, describe) -> dict[str, dict]:
    """Per task, `describe(model, texts)` of its fit, held-out and test texts, drawn as the trainer
    draws them."""
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
                               "test": computed[len(fit) + len(held):]}
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    text_arguments(parser)
    parser.add_argument("--accept", type=float, default=0.99, help="router.accept_quantile")
    parser.add_argument("--json", default="benchmarks/results/routing.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    features = featurise(args, lambda model, texts: text_features(model, texts, args.max_length, 16))

    router = fitted(TASKS, features, args.accept)
    confusion = {}
    for task in TASKS:
        routed = [r or REFUSED for r in router.predict(features[task]["test"])]
        confusion[task] = {t: routed.count(t) for t in (*TASKS, REFUSED)}
    accuracy = {t: confusion[t][t] / sum(confusion[t].values()) for t in TASKS}

    unseen = {}
    for stranger in TASKS:
        known = [t for t in TASKS if t != stranger]
        router = fitted(known, features, args.accept)
        refused = router.predict(features[stranger]["test"]).count(None) / len(features[stranger]["test"])
        right = {t: router.predict(features[t]["test"]).count(t) / len(features[t]["test"]) for t in known}
        unseen[stranger] = {"refused": refused, "known_routed_right": right, "known_routed_right_min": min(right.values())}

    name, _ = cpu()
    print(f"\nrouter fit on {args.fit_per_task} training texts per task, acceptance distance from "
          f"{args.calibrate_per_task} others at the {args.accept} quantile; test: up to {args.test_per_label} per label ({name})\n")
    print("| true task | routed right | " + " | ".join(f"→ {t}" for t in (*TASKS, REFUSED)) + " |\n|---|---|"
          + "---|" * (len(TASKS) + 1))
    for t in TASKS:
        print(f"| {t} | {100 * accuracy[t]:.1f} | " + " | ".join(str(confusion[t][u]) for u in (*TASKS, REFUSED)) + " |")
    print("\n| task never learned | its texts refused | known tasks routed right (lowest) |\n|---|---|---|")
    for t, r in unseen.items():
        print(f"| {t} | {100 * r['refused']:.1f} | {100 * r['known_routed_right_min']:.1f} |")
    Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": name, "accuracy": accuracy, "confusion": confusion,
                                           "unseen": unseen}, indent=2))


if __name__ == "__main__":
    main()
