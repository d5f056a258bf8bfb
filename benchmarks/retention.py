"""What keeps an old task's answers while the shared expert learns a new one? Train dbpedia, then
yahoo (also topic classification: the most interference among the tuning tasks) with each retention
setting (same first stage, same seeds), and compare dbpedia's change and yahoo's accuracy. Prints a
table, writes JSON.

MoE-CL's dedicated experts and (per-task) gates of old tasks are frozen, so an old task can only
move through the shared expert: these settings bound that drift.

    python benchmarks/retention.py [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from moecl.config import config_from_dict
from moecl.metrics import mean_ci
from moecl.trainer import Trainer

TASKS = ("dbpedia", "yahoo")
VARIANTS = {
    "none": {"distill": 0.0, "shared_l2": 0.0},
    "distill": {"distill": 1.0, "shared_l2": 0.0},
    "shared-l2": {"distill": 0.0, "shared_l2": 1.0},
    "distill + shared-l2": {"distill": 1.0, "shared_l2": 1.0},
}


def config(args, seed: int, tasks, retention: dict):
    return config_from_dict({
        "backbone": "smollm2-135m-instruct", "method": "moecl", "retention": retention,
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "max_length": 96, "max_per_label": args.train_per_label,
                  "seed": seed},
        "eval": {"max_per_label": args.test_per_label, "batch_size": 16, "routing": False},
        "router": {"fit_per_task": 0},
        "tasks": [{"name": t, "data": str(Path(args.data) / t)} for t in tasks],
    }, source=f"retention:seed{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mtl5"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-per-label", type=int, default=16)
    parser.add_argument("--test-per-label", type=int, default=12)
    parser.add_argument("--out", default="runs/retention")
    parser.add_argument("--json", default="benchmarks/results/retention.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    runs = {}
    for seed in args.seeds:
        first = out / f"first-seed{seed}"
        if not (first / "metrics.json").is_file():
            Trainer(config(args, seed, TASKS[:1], VARIANTS["none"]), first).run(resume=True)
        for name, retention in VARIANTS.items():
            folder = out / f"{name.replace(' ', '')}-seed{seed}"
            if not folder.exists():  # continue the shared first stage
                shutil.copytree(first / "checkpoint", folder / "checkpoint")
            matrix = Trainer(config(args, seed, TASKS, retention), folder).run(resume=True)["accuracy_matrix"]
            runs[f"{name}/seed{seed}"] = {"first_after_first": matrix[0][0], "first_after_second": matrix[1][0],
                                          "second": matrix[1][1]}
            print(name, seed, runs[f"{name}/seed{seed}"], flush=True)
    summary = {}
    for name in VARIANTS:
        mine = [r for k, r in runs.items() if k.startswith(f"{name}/")]
        summary[name] = {"drop": mean_ci([r["first_after_second"] - r["first_after_first"] for r in mine]),
                         "second": mean_ci([r["second"] for r in mine]), "seeds": len(mine), "settings": VARIANTS[name]}
    print(f"\n| retention | seeds | {TASKS[0]} change after {TASKS[1]} | {TASKS[1]} accuracy |\n|---|---|---|---|")
    for name, s in summary.items():
        ci = lambda stat: "" if stat["ci95"] is None else f" ± {100 * stat['ci95']:.1f}"  # noqa: E731
        print(f"| {name} | {s['seeds']} | {100 * s['drop']['mean']:+.1f}{ci(s['drop'])} | "
              f"{100 * s['second']['mean']:.1f}{ci(s['second'])} |")
    Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
