"""Serving latency of the registered champion: p50 / p95 per request and rows/s over HTTP
(`mlflow models serve` on loopback), for batches that mix every task and rows without a task; and,
in process on the same mixed batch, label scoring batched across tasks against one task at a time.

The champion is SmolLM2 with one expert per task of the shipped sample, trained for one step per
task (latency depends on the shapes, not on what the weights learned), registered in a scratch
MLflow store. Prints a markdown table, writes JSON.

    python benchmarks/serving.py [--batches 1 8 32] [--requests 10] [--out benchmarks/results/serving.json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import requests
import torch

from moecl.checkpoint import load_model
from moecl.config import config_from_dict
from moecl.data import load_task
from moecl.mlops import lifecycle, registry
from moecl.mlops.loopback import start_mlflow, stop
from moecl.scoring import label_scores, row_label_scores
from moecl.trainer import Trainer

DATA = Path(__file__).resolve().parents[1] / "samples" / "mtl5"
UNTOLD = 4  # every 4th row comes without a task and is routed


def champion(root: Path, backbone: str) -> str:
    """Train the sample's tasks for one step each, register the result as champion; its tracking URI."""
    tasks = sorted(p.name for p in DATA.iterdir() if p.is_dir())
    cfg = config_from_dict({"backbone": backbone, "train": {"max_per_label": 1, "batch_size": 8, "max_length": 128},
                            "eval": {"max_per_label": 1, "routing": False}, "router": {"fit_per_task": 32},
                            "tasks": [{"name": t, "data": str(DATA / t)} for t in tasks]})
    Trainer(cfg, root / "run").run()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id, _ = lifecycle.claim(tracking_uri, "0" * 32, lifecycle.Policy(), str(root / "artifacts"))
    version = registry.register(tracking_uri, "moecl", run_id, root / "run" / "checkpoint", {})
    registry.promote(tracking_uri, "moecl", version, None, "benchmark", "serving latency")
    return tracking_uri


def mixed_rows(tests: dict[str, list], size: int, rng: random.Random) -> list[dict]:
    """`size` test rows, tasks in turn, every UNTOLD-th without its task."""
    names = list(tests)
    rows = []
    for i in range(size):
        example = rng.choice(tests[names[i % len(names)]])
        rows.append({"text": example.text, **({} if i % UNTOLD == UNTOLD - 1 else {"task": example.task})})
    return rows


def invoke(url: str, rows: list[dict]) -> float:
    """Seconds for one request of these rows (the answers are checked to be one label per row)."""
    payload = {"dataframe_records": [{"task": r.get("task"), "text": r["text"]} for r in rows]}
    started = time.perf_counter()
    response = requests.post(f"{url}/invocations", json=payload, timeout=600)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    if len(response.json()["predictions"]) != len(rows):
        raise RuntimeError(f"{len(rows)} rows, {len(response.json()['predictions'])} answers")
    return seconds


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def in_process(checkpoint: Path, rows: list[dict], repeats: int) -> dict[str, float]:
    """Median seconds to score one mixed batch (rows with a task): across tasks in one batch, and
    one task at a time (the evaluation path)."""
    model, prompts, _ = load_model(checkpoint)
    told = [r for r in rows if "task" in r]
    texts, tasks = [r["text"] for r in told], [r["task"] for r in told]

    def per_task():
        for task in dict.fromkeys(tasks):
            label_scores(model, prompts[task], [t for t, k in zip(texts, tasks) if k == task], len(told))

    timings = {"across tasks": lambda: row_label_scores(model, prompts, texts, tasks, len(told)), "one task at a time": per_task}
    seconds = {name: [] for name in timings}
    for _ in range(repeats):
        for name, run in timings.items():  # in turn, so machine noise falls on both
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=10, help="timed requests per batch size (after 1 warm-up)")
    parser.add_argument("--out", default="benchmarks/results/serving.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    tests = {p.name: load_task(p.name, p).test for p in sorted(DATA.iterdir()) if p.is_dir()}
    results, table = {"backbone": args.backbone, "threads": torch.get_num_threads(), "http": {}}, []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tracking_uri = champion(root, args.backbone)
        process, url = start_mlflow(["models", "serve", "-m", "models:/moecl@champion", "--env-manager", "local",
                                     "--workers", "1"], root / "server.log", "/ping", env={"MLFLOW_TRACKING_URI": tracking_uri})
        try:
            for size in args.batches:
                invoke(url, mixed_rows(tests, size, rng))  # warm-up
                seconds = [invoke(url, mixed_rows(tests, size, rng)) for _ in range(args.requests)]
                entry = {"p50_s": percentile(seconds, 50), "p95_s": percentile(seconds, 95),
                         "rows_per_s": size * len(seconds) / sum(seconds), "requests": len(seconds)}
                results["http"][str(size)] = entry
                table.append(f"| {size} | {entry['p50_s']:.3f} | {entry['p95_s']:.3f} | {entry['rows_per_s']:.1f} |")
        finally:
            stop(process)
        largest = max(args.batches)
        results["in_process"] = {"rows": largest, **in_process(root / "run" / "checkpoint", mixed_rows(tests, largest, rng), 3)}
    print(f"{args.backbone}, {results['threads']} CPU threads; rows mix every task, every {UNTOLD}th routed.\n")
    print("| rows per request | p50 s | p95 s | rows/s |\n|---|---|---|---|\n" + "\n".join(table))
    scoring = results["in_process"]
    print(f"\nIn process, {largest} rows with tasks: across tasks {scoring['across tasks']:.3f} s, "
          f"one task at a time {scoring['one task at a time']:.3f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
