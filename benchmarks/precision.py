"""bf16 against fp32 on this machine's CPU: the same short MoE-CL run (SmolLM2, one task) trained and
scored in each precision, with the run's time per optimizer step (the trainer's whole run: the
steps, its before/after scoring, routing statistics and checkpoint), the scoring time of the test
set alone and the accuracy. Whether the CPU has bf16 units (AMX: `amx_bf16`, or AVX-512 bf16:
`avx512_bf16` in /proc/cpuinfo) decides whether bf16 can pay at all: without them PyTorch emulates
bf16 matmuls. The file is named by AMX; the JSON records both flags.

    python benchmarks/precision.py [--task dbpedia] [--train-per-label 8] [--test-per-label 10]

Prints a table and writes benchmarks/results/precision-<amx|no-amx>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from moecl.checkpoint import load_model
from moecl.config import config_from_dict
from moecl.data import load_task, per_label
from moecl.scoring import label_scores
from moecl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mtl5"


def cpu() -> tuple[str, bool]:
    """(model name, whether it has AMX bf16 units)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor())
    return name, " amx_bf16" in info


def cpu_has_avx512_bf16() -> bool:
    return Path("/proc/cpuinfo").is_file() and " avx512_bf16" in Path("/proc/cpuinfo").read_text()


def run(precision: str, args, out: Path) -> dict:
    cfg = config_from_dict({
        "backbone": "smollm2-135m-instruct", "method": "moecl",
        "tasks": [{"name": args.task, "data": str(args.data / args.task)}],
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "max_length": 128, "seed": 0,
                  "max_per_label": args.train_per_label, "precision": precision},
        "eval": {"max_per_label": args.test_per_label, "batch_size": 8},
    }, source="benchmarks/precision.py")
    trainer = Trainer(cfg, out / precision)
    metrics = trainer.run()
    steps = len(json.loads((out / precision / "checkpoint" / "manifest.json").read_text())["progress"]["curve"])
    model, prompts, _ = load_model(out / precision / "checkpoint")
    data = load_task(args.task, args.data / args.task)
    examples = per_label(data.test, args.test_per_label, 0)
    started = time.perf_counter()
    scores = label_scores(model, prompts[args.task], [e.text for e in examples], 8)
    scoring = time.perf_counter() - started
    predicted = scores.argmax(-1).tolist()
    accuracy = sum(prompts[args.task].labels[p] == data.labels[e.label] for p, e in zip(predicted, examples))
    return {"precision": precision, "train_steps": steps, "run_seconds": metrics["train_seconds"],
            "run_seconds_per_step": metrics["train_seconds"] / steps, "scored_rows": len(examples),
            "scoring_seconds": scoring, "rows_per_second": len(examples) / scoring,
            "accuracy": accuracy / len(examples), "predictions": predicted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dbpedia")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train-per-label", type=int, default=8)
    parser.add_argument("--test-per-label", type=int, default=10)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "precision")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name, amx = cpu()
    results = [run(p, args, args.work) for p in args.precisions]
    base = results[0]
    for result in results:
        result["run_speedup"] = base["run_seconds_per_step"] / result["run_seconds_per_step"]
        result["scoring_speedup"] = result["rows_per_second"] / base["rows_per_second"]
        result["same_predictions"] = sum(a == b for a, b in zip(result["predictions"], base["predictions"])) / len(
            base["predictions"])
    print(f"CPU: {name} ({'AMX' if amx else 'no AMX'}), {args.threads} threads; {args.task}, "
          f"{args.train_per_label} train / {args.test_per_label} test per label")
    print("| precision | run s/step | run speedup | rows/s scored | scoring speedup | accuracy | same answers as fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['precision']} | {r['run_seconds_per_step']:.2f} | {r['run_speedup']:.2f}x | {r['rows_per_second']:.2f} "
              f"| {r['scoring_speedup']:.2f}x | {r['accuracy']:.3f} | {r['same_predictions']:.3f} |")
    out = args.out or ROOT / "benchmarks" / "results" / f"precision-{'amx' if amx else 'no-amx'}.json"
    out.write_text(json.dumps({"cpu": name, "amx": amx, "avx512_bf16": cpu_has_avx512_bf16(), "threads": args.threads, "task": args.task,
                               "train_per_label": args.train_per_label, "test_per_label": args.test_per_label,
                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
