"""The whole accuracy matrix of one MoE-CL order1 run, computed two ways from the same stage
checkpoints in one process: the old way (every stage scores every task seen so far, every label of
every example) and the new way (a task is scored again only when a digest of the tensors its
answers read changed, `ContinualModel.scoring_digest`; labels ranked by `rank_labels`, which
finishes only those that can reach the top two). Every prediction must be identical.

    python benchmarks/evaluation.py [--train-per-label 8] [--test-per-label 50] [--precision fp32]

Prints a table and writes benchmarks/results/evaluation.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from moecl.checkpoint import load_model
from moecl.config import config_from_dict
from moecl.data import load_task, per_label
from moecl.scoring import label_scores, margins, rank_labels
from moecl.trainer import Trainer

from precision import cpu  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mtl5"
ORDER1 = ["dbpedia", "amazon", "yahoo", "agnews"]


def train_stages(args, work: Path) -> list[Path]:
    """One fixed training of order1; a copy of the checkpoint after each stage."""
    stages = [work / f"stage-{i + 1}" for i in range(len(ORDER1))]
    if all((s / "manifest.json").is_file() for s in stages):
        return stages  # resumable: the training is the fixed input of both ways
    shutil.rmtree(work / "run", ignore_errors=True)
    cfg = config_from_dict({
        "backbone": "smollm2-135m-instruct", "method": "moecl",
        "tasks": [{"name": t, "data": str(args.data / t)} for t in ORDER1],
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "max_length": 128, "seed": 0,
                  "max_per_label": args.train_per_label, "precision": args.precision},
        "eval": {"max_per_label": 1, "batch_size": 8, "routing": False},
    }, source="benchmarks/evaluation.py")
    trainer = Trainer(cfg, work / "run")
    done = []

    def keep(folder: Path) -> None:
        target = stages[len(done)]
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
        done.append(target)

    trainer.on_checkpoint = keep
    trainer.run()
    return stages


def matrix(stages: list[Path], args, new_way: bool) -> tuple[list[list[list[int]]], list[list[list[float]]], int, float]:
    """(predictions[stage][task], margins[stage][task], examples scored, seconds scoring)."""
    examples = {t: per_label(load_task(t, args.data / t).test, args.test_per_label, 0) for t in ORDER1}
    seen: dict[tuple, tuple[list[int], list[float]]] = {}
    predictions, sure, scored, seconds = [], [], 0, 0.0
    for number, stage in enumerate(stages, start=1):
        model, prompts, _ = load_model(stage)
        row_p, row_m = [], []
        for task in ORDER1[:number]:
            texts = [e.text for e in examples[task]]
            key = (task, model.scoring_digest(task))
            started = time.perf_counter()
            if new_way and key in seen:
                best, margin = seen[key]
            elif new_way:
                best, margin = seen.setdefault(key, rank_labels(model, prompts[task], texts, 8))
                scored += len(texts)
            else:
                scores = label_scores(model, prompts[task], texts, 8)
                best, margin = scores.argmax(-1).tolist(), margins(scores)
                scored += len(texts)
            seconds += time.perf_counter() - started
            row_p.append(best)
            row_m.append(margin)
        predictions.append(row_p)
        sure.append(row_m)
    return predictions, sure, scored, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-per-label", type=int, default=8)
    parser.add_argument("--test-per-label", type=int, default=50)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "evaluation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "evaluation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name, amx = cpu()
    stages = train_stages(args, args.work / args.precision)
    old = matrix(stages, args, new_way=False)
    new = matrix(stages, args, new_way=True)
    rows = sum(len(p) for stage in old[0] for p in stage)  # the matrix's examples, reused or not
    identical = old[0] == new[0]
    largest_margin_gap = max(abs(a - b) for so, sn in zip(old[1], new[1]) for to, tn in zip(so, sn)
                             for a, b in zip(to, tn) if a != float("inf"))
    result = {
        "cpu": name, "amx": amx, "threads": args.threads, "precision": args.precision, "sequence": ORDER1,
        "test_per_label": args.test_per_label, "matrix_examples": rows,
        "old": {"scored_examples": old[2], "seconds": round(old[3], 1), "examples_per_second": round(rows / old[3], 2)},
        "new": {"scored_examples": new[2], "seconds": round(new[3], 1), "examples_per_second": round(rows / new[3], 2)},
        "speedup": round(old[3] / new[3], 2), "identical": identical, "largest_margin_difference": largest_margin_gap,
    }
    print(f"{'way':<6} {'scored':>7} {'seconds':>8} {'matrix ex/s':>11}   ({name}, {args.threads} threads, {args.precision})")
    for way in ("old", "new"):
        r = result[way]
        print(f"{way:<6} {r['scored_examples']:>7} {r['seconds']:>8} {r['examples_per_second']:>11}")
    print(f"speedup {result['speedup']}x, identical predictions: {identical}, largest margin difference "
          f"{largest_margin_gap:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
