"""Task-free routing accuracy on the five MTL5 tasks: the router is fit on each task's training texts
and asked for the task of its test texts. It reads only the frozen backbone, so no training is
needed and the numbers hold for every trained model of that backbone. Prints a table (with the
confusion counts), writes JSON.

    python benchmarks/routing.py [--fit-per-task 256] [--test-per-label 50]
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from moecl.config import config_from_dict
from moecl.data import per_label
from moecl.task_router import text_features
from moecl.trainer import Trainer

TASKS = ("dbpedia", "amazon", "yahoo", "agnews", "yelp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mtl5"))
    parser.add_argument("--fit-per-task", type=int, default=256)
    parser.add_argument("--test-per-label", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--json", default="benchmarks/results/routing.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = config_from_dict({
        "backbone": "smollm2-135m-instruct", "method": "moecl",
        "train": {"max_length": args.max_length}, "router": {"fit_per_task": args.fit_per_task},
        "eval": {"max_per_label": args.test_per_label, "batch_size": 16},
        "tasks": [{"name": t, "data": str(Path(args.data) / t)} for t in TASKS],
    }, source="routing")
    trainer = Trainer(cfg, "unused")
    model = trainer.model
    for task in trainer.tasks:
        model.add_task(task.name, task.labels)
        texts = [e.text for e in per_label(task.train, None, 0)][: args.fit_per_task]
        model.task_router.fit(task.name, text_features(model, texts, args.max_length, 16))
    confusion = {}
    for task in trainer.tasks:
        texts = [e.text for e in trainer.test_sets[task.name]]
        routed = model.task_router.predict(text_features(model, texts, args.max_length, 16))
        confusion[task.name] = {t: routed.count(t) for t in TASKS}
    accuracy = {t: confusion[t][t] / sum(confusion[t].values()) for t in TASKS}
    print(f"\nrouter fit on {args.fit_per_task} training texts per task; test: up to {args.test_per_label} per label\n")
    print("| true task | accuracy | " + " | ".join(f"→ {t}" for t in TASKS) + " |\n|---|---|" + "---|" * len(TASKS))
    for t in TASKS:
        print(f"| {t} | {100 * accuracy[t]:.1f} | " + " | ".join(str(confusion[t][u]) for u in TASKS) + " |")
    Path(args.json).write_text(json.dumps({"args": vars(args), "accuracy": accuracy, "confusion": confusion}, indent=2))


if __name__ == "__main__":
    main()
