"""Every method on one task sequence over several seeds: AA, BWT, FWT as mean and 95% CI, R[i][i]
next to chance, task-free routing accuracy, and the moecl - moecl-nogan difference paired by seed.

Each finished (method, seed) run is written to the JSON at once, so an interrupted benchmark resumes
where it stopped; `summary` is rebuilt from every run in the file. Several workers may share one file
(each with its own methods or seeds, e.g. one per core): every write re-reads it under a lock. With --readme, the table between
`<!-- STEM -->` markers in that file (STEM: the JSON file's name without .json) is replaced.

    python benchmarks/quality.py --sequence order1 --seeds 0 1 2 [--methods moecl inc-lora ...]
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from moecl.config import METHODS, config_from_dict
from moecl.methods import REGISTRY
from moecl.metrics import mean_ci
from moecl.probe import shared_expert_probe

SEQUENCES = {
    "order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "order3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "five": ["dbpedia", "amazon", "yahoo", "agnews", "yelp"],
    # yelp was never used to choose a design or a setting: a held-out check. Its binary version
    # (Yelp Polarity's rule: 1-2 stars negative, 4-5 positive, 3 dropped) is learnable at this budget.
    "heldout-pair": ["agnews", "yelp-polarity"],
}
# Tasks built from a source task's folder by mapping its labels (rows whose label is not mapped are dropped).
DERIVED = {
    "yelp-polarity": ("yelp", {"very negative": "negative", "negative": "negative",
                               "positive": "positive", "very positive": "positive"}),
}


def task_folder(task: str, data: Path, out: Path) -> Path:
    """The folder of a task: a source task in `data`, or a derived one written once under `out` (by
    whichever worker sharing `out` finishes first)."""
    if task not in DERIVED:
        return data / task
    source, mapping = DERIVED[task]
    folder = out / "derived" / task
    if not (folder / "labels.json").is_file():
        (out / "derived").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=out / "derived"))  # one per worker
        for split in ("train", "test"):
            rows = [json.loads(line) for line in (data / source / f"{split}.jsonl").read_text().splitlines() if line.strip()]
            kept = [{"text": r["text"], "label": mapping[r["label"]]} for r in rows if r["label"] in mapping]
            (staging / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        (staging / "labels.json").write_text(json.dumps(list(dict.fromkeys(mapping.values()))))
        try:
            staging.rename(folder)
        except OSError:  # another worker sharing `out` built it first
            shutil.rmtree(staging)
    return folder


def run_one(method: str, seed: int, args, tasks: list[str], baseline: list[float] | None) -> dict:
    """One (method, seed) run. `baseline`: the bare backbone's accuracy on this seed's test sets if
    another method already measured it (it depends on neither the method nor training)."""
    from moecl.trainer import Trainer

    raw = {
        "backbone": args.backbone,
        "method": method,
        "adversarial": {"weight": args.adversarial_weight},
        "memory": {"per_task": args.memory_per_task, "per_batch": args.memory_per_batch},
        "retention": {"shared": args.retention_shared},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length,
                  "max_per_label": args.train_per_label, "seed": seed, "precision": args.precision},
        "eval": {"max_per_label": args.test_per_label, "batch_size": 16, "forward_transfer": method != "mtl",
                 "every_stage": False, "routing": method == "moecl"},
        "router": {"fit_per_task": args.router_fit if method == "moecl" else 0},
        "tasks": [{"name": t, "data": str(task_folder(t, Path(args.data), Path(args.out)))} for t in tasks],
    }
    cfg = config_from_dict(raw, source=f"quality:{method}:seed{seed}")
    started = time.time()
    trainer = Trainer(cfg, Path(args.out) / args.sequence / f"{method}-seed{seed}")
    if cfg.eval.forward_transfer:
        trainer.progress.baseline = baseline  # a resumed checkpoint brings its own
    probes = []
    if args.probe_per_task and REGISTRY[method].shared_expert_with_gate:
        trainer.on_checkpoint = lambda folder: probes.append(probe_after_stage(trainer, args.probe_per_task))
    metrics = trainer.run(resume=True)
    metrics["wall_seconds"] = round(time.time() - started, 1)
    if probes:
        metrics["probe"] = [p for p in probes if p]  # stages of a resumed run done before are not probed
    return metrics


def probe_after_stage(trainer, per_task: int) -> dict | None:
    """The shared-expert probe (moecl.probe) on the tasks seen so far: fit on training texts, scored
    on test texts; None after the first stage (one task: nothing to tell apart)."""
    from moecl.data import per_label

    tasks = trainer.model.tasks
    if len(tasks) < 2:
        return None
    data = {t: trainer.task_data[t] for t in tasks}
    train = {t: [e.text for e in per_label(d.train, None, 1)[:per_task]] for t, d in data.items()}
    test = {t: [e.text for e in trainer.test_sets[t]][:per_task] for t in tasks}
    return shared_expert_probe(trainer.model, train, test, trainer.cfg.train.max_length)


def diagonal(metrics: dict) -> list[float]:
    matrix = metrics["accuracy_matrix"]
    return matrix[0] if len(matrix) == 1 else [matrix[i][i] for i in range(len(matrix))]  # mtl: its one row


def summarise(runs: dict[str, dict]) -> dict:
    by_method: dict[str, dict[int, dict]] = {}
    for key, metrics in runs.items():
        method, seed = key.rsplit("/seed", 1)
        by_method.setdefault(method, {})[int(seed)] = metrics
    summary = {}
    for method, seeds in by_method.items():
        ms = list(seeds.values())
        tasks = ms[0]["tasks"]
        entry = {"seeds": len(ms), "aa": mean_ci([m["aa"] for m in ms])}
        for key in ("bwt", "fwt"):
            values = [m[key] for m in ms if m.get(key) is not None]
            entry[key] = mean_ci(values) if values else None
        entry["diagonal"] = {t: mean_ci([diagonal(m)[i] for m in ms]) for i, t in enumerate(tasks)}
        adversary = [statistics.fmean(st["disc_acc"] for st in m["training"][1:])
                     for m in ms if len(m.get("training", [])) > 1 and "disc_acc" in m["training"][1]]
        if adversary:  # balanced accuracy of the discriminators on later stages; chance is 1 / tasks in a batch
            entry["discriminator_accuracy"] = mean_ci(adversary)
        routed = [m["routing_accuracy"] for m in ms if m.get("routing_accuracy")]
        if routed:
            entry["routing_accuracy"] = {t: mean_ci([r[t] for r in routed]) for t in tasks}
        probed = [m["probe"][-1]["mean"] - m["probe"][-1]["chance"] for m in ms if m.get("probe")]
        if probed:  # the last stage's probe, above chance
            entry["probe_above_chance"] = mean_ci(probed)
        summary[method] = entry
    for other in by_method:
        paired = sorted(set(by_method.get("moecl", {})) & set(by_method[other])) if other != "moecl" else []
        if paired:
            diff = {"seeds": len(paired)}
            for key in ("aa", "bwt", "fwt"):
                values = [by_method["moecl"][s][key] - by_method[other][s][key] for s in paired
                          if by_method["moecl"][s].get(key) is not None and by_method[other][s].get(key) is not None]
                diff[key] = mean_ci(values) if values else None
            probes = [by_method["moecl"][s]["probe"][-1]["mean"] - by_method[other][s]["probe"][-1]["mean"]
                      for s in paired if by_method["moecl"][s].get("probe") and by_method[other][s].get("probe")]
            if probes:
                diff["probe"] = mean_ci(probes)
            summary[f"moecl minus {other}"] = diff
    return summary


def _points(stat: dict | None, signed: bool = False) -> str:
    if stat is None:
        return "n/a"
    mean = f"{100 * stat['mean']:+.1f}" if signed else f"{100 * stat['mean']:.1f}"
    return mean if stat["ci95"] is None else f"{mean} ± {100 * stat['ci95']:.1f}"


def table(summary: dict, tasks: list[str], chance: dict[str, float]) -> str:
    head = ("| method | seeds | AA | BWT | FWT | "
            + " | ".join(f"R[{t}][{t}] (chance {100 * chance[t]:.0f})" for t in tasks) + " |")
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for method, s in summary.items():
        if method.startswith("moecl minus "):
            continue
        cells = [_points(s["aa"]), _points(s["bwt"], True), _points(s["fwt"], True)]
        cells += [_points(s["diagonal"][t]) for t in tasks]
        lines.append(f"| {method} | {s['seeds']} | " + " | ".join(cells) + " |")
    diffs = {k.removeprefix("moecl minus "): v for k, v in summary.items() if k.startswith("moecl minus ")}
    if diffs:
        lines.append("\nmoecl minus each other method, paired by seed (points):\n\n| minus | seeds | AA | BWT | FWT | "
                     "shared-expert probe |\n|---|---|---|---|---|---|")
        for other, d in diffs.items():
            lines.append(f"| {other} | {d['seeds']} | {_points(d['aa'], True)} | {_points(d['bwt'], True)} | "
                         f"{_points(d['fwt'], True)} | {_points(d.get('probe'), True)} |")
    adversary = summary.get("moecl", {}).get("discriminator_accuracy")
    if adversary:
        lines.append(f"moecl's discriminators on stages after the first (balanced accuracy; a batch holds the current "
                     f"task and memory of old ones, so chance is at most 50): {_points(adversary)}.")
    routed = summary.get("moecl", {}).get("routing_accuracy")
    if routed:
        lines.append("Task-free routing accuracy (moecl's router, test texts): "
                     + ", ".join(f"{t} {_points(routed[t])}" for t in tasks) + ".")
    return "\n".join(lines)


def write_readme(path: Path, name: str, text: str) -> None:
    """Replace the text between `<!-- NAME -->` and `<!-- /NAME -->` (NAME: the results file's stem)."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    readme = path.read_text()
    if begin not in readme:
        raise SystemExit(f"{path}: no {begin} marker to put the table of {name}.json under")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", readme))


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock beside `path`, so workers that share one results file (each on its own
    core and methods) never overwrite each other's runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load(path: Path, default: dict) -> dict:
    """The results file as it is now (read under the lock), or `default` where there is none yet."""
    with locked(path):
        return json.loads(path.read_text()) if path.is_file() else default


def store(path: Path, record: dict, key: str, metrics: dict) -> dict:
    """Add one finished run to the file as it is now (re-read under the lock), rebuild the summary and
    replace the file atomically; returns the record written."""
    with locked(path):
        if path.is_file():
            record = json.loads(path.read_text())
        record["runs"][key] = metrics
        record["summary"] = summarise(record["runs"])
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(record, indent=2))
        staging.replace(path)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mtl5"))
    parser.add_argument("--sequence", choices=sorted(SEQUENCES), default="order1")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--train-per-label", type=int, default=8)
    parser.add_argument("--test-per-label", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                        help="train.precision (the library default auto: bf16 on CPUs with bf16 units; the resolved one is recorded per run)")
    parser.add_argument("--adversarial-weight", type=float, default=0.1)
    parser.add_argument("--memory-per-task", type=int, default=16)
    parser.add_argument("--memory-per-batch", type=int, default=2)
    parser.add_argument("--router-fit", type=int, default=256, help="training texts per task for the router")
    parser.add_argument("--retention-shared", choices=["snapshot", "live"], default="snapshot",
                        help="moecl: old tasks read a frozen snapshot of the shared expert, or the live one")
    parser.add_argument("--probe-per-task", type=int, default=64,
                        help="texts per task to fit and to score the shared-expert probe after each stage (0: none)")
    parser.add_argument("--out", default="runs/quality", help="run folders (checkpoints, heatmaps)")
    parser.add_argument("--json", help="default: benchmarks/results/quality.json for order1, else quality-SEQUENCE.json")
    parser.add_argument("--readme", type=Path, help="replace this file's table for the sequence")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tasks = SEQUENCES[args.sequence]
    name = "quality" if args.sequence == "order1" else f"quality-{args.sequence}"
    path = Path(args.json or f"benchmarks/results/{name}.json")
    # The probe measures a run; it changes nothing in it, so runs with and without it are comparable.
    settings = {k: v for k, v in vars(args).items()
                if k not in ("methods", "seeds", "json", "readme", "out", "data", "probe_per_task")}
    record = load(path, {"settings": settings, "runs": {}})
    record["settings"].setdefault("precision", "fp32")  # files written before --precision ran in fp32
    if record["settings"] != settings:
        raise SystemExit(f"{path} holds runs made with other settings {record['settings']}; pass another --json")
    for seed in args.seeds:
        for method in args.methods:
            key = f"{method}/seed{seed}"
            record = load(path, record)  # another worker on the same file may have finished runs since
            if key in record["runs"]:
                continue
            measured = [r["baseline"] for k, r in record["runs"].items() if k.endswith(f"/seed{seed}") and r.get("baseline")]
            metrics = run_one(method, seed, args, tasks, measured[0] if measured else None)
            record = store(path, record, key, metrics)
            print(f"{key}: AA {100 * metrics['aa']:.1f} in {metrics['wall_seconds']:.0f}s", flush=True)
    record = load(path, record)
    chance = next(iter(record["runs"].values()))["chance"]
    text = (f"{args.sequence} ({' → '.join(tasks)}); {args.backbone}; {args.train_per_label} train / "
            f"{args.test_per_label} test examples per label; {args.epochs} epoch, batch {args.batch_size}, "
            f"lr {args.lr}, max_length {args.max_length}; points, mean ± 95% CI over seeds.\n\n"
            + table(record["summary"], tasks, chance))
    print("\n" + text)
    if args.readme:
        write_readme(args.readme, path.stem, text)


if __name__ == "__main__":
    main()
