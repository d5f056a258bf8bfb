"""Every method side by side on one MTL5 task order: AA, BWT and R[i][i] next to chance.

All methods share one budget (examples per label, epochs, learning rate, max length), one seed and
one evaluation set, and run in this process one after another. Prints a markdown table, writes JSON.

    python benchmarks/quality.py --data ../shared/data/mtl5 [--train-per-label 8] [--test-per-label 8]
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from moecl.config import METHODS, config_from_dict

ORDERS = {
    "order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "order3": ["yahoo", "amazon", "agnews", "dbpedia"],
}


def run_method(method: str, args, out: Path) -> dict:
    from moecl.trainer import Trainer

    raw = {
        "backbone": args.backbone,
        "method": method,
        "adversarial": {"weight": args.adversarial_weight},
        "memory": {"per_task": args.memory_per_task, "per_batch": args.memory_per_batch},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length,
                  "max_per_label": args.train_per_label, "seed": args.seed},
        "eval": {"max_per_label": args.test_per_label, "batch_size": args.batch_size},
        "tasks": [{"name": t, "data": str(Path(args.data) / t)} for t in ORDERS[args.order]],
    }
    cfg = config_from_dict(raw, source=f"quality:{method}")
    started = time.time()
    metrics = Trainer(cfg, out / method).run(resume=args.resume)
    metrics["wall_seconds"] = round(time.time() - started, 1)
    return metrics


def table(results: dict[str, dict], tasks: list[str]) -> str:
    chance = next(iter(results.values()))["chance"]
    head = "| method | AA | BWT | " + " | ".join(f"R[{t}][{t}] (chance {100 * chance[t]:.0f})" for t in tasks) + " | minutes |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for method, m in results.items():
        matrix = m["accuracy_matrix"]
        # mtl trains once on everything: its single row is its R[i][i].
        diagonal = matrix[0] if len(matrix) == 1 else [matrix[i][i] for i in range(len(tasks))]
        bwt = "n/a" if m["bwt"] is None else f"{100 * m['bwt']:+.1f}"
        lines.append(f"| {method} | {100 * m['aa']:.1f} | {bwt} | " + " | ".join(f"{100 * a:.1f}" for a in diagonal)
                     + f" | {m['wall_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mtl5"))
    parser.add_argument("--order", choices=sorted(ORDERS), default="order1")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--train-per-label", type=int, default=8)
    parser.add_argument("--test-per-label", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--adversarial-weight", type=float, default=0.1)
    parser.add_argument("--memory-per-task", type=int, default=16)
    parser.add_argument("--memory-per-batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/quality", help="run folders (checkpoints, heatmaps)")
    parser.add_argument("--json", default="benchmarks/results/quality.json")
    parser.add_argument("--resume", action="store_true", help="continue unfinished method runs in --out")
    parser.add_argument("--update", action="store_true",
                        help="re-run only --methods and replace their rows in an existing --json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    out = Path(args.out)
    started = time.time()
    previous = json.loads(Path(args.json).read_text()) if args.update else {"results": {}, "total_seconds": 0.0}
    results = {}
    for method in args.methods:
        results[method] = run_method(method, args, out)
        print(f"\n{method}: AA {100 * results[method]['aa']:.1f} in {results[method]['wall_seconds']:.0f}s", flush=True)
    total = time.time() - started
    if args.update:  # keep the other methods' rows, in their order
        replaced = sum(previous["results"][m]["wall_seconds"] for m in results if m in previous["results"])
        total += previous["total_seconds"] - replaced
        results = {m: results.get(m, r) for m, r in previous["results"].items()} | results
    tasks = ORDERS[args.order]
    print(f"\nMTL5 {args.order} ({', '.join(tasks)}), {args.backbone}, {args.train_per_label} train / "
          f"{args.test_per_label} test examples per label, {args.epochs} epoch(s), lr {args.lr}, "
          f"max_length {args.max_length}, seed {args.seed}; total {total / 60:.1f} min\n")
    print(table(results, tasks))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "total_seconds": round(total, 1),
                                                  "results": results}, indent=2))


if __name__ == "__main__":
    main()
