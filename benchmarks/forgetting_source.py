"""Where does MoE-CL's forgetting come from? Train dbpedia then amazon, then score dbpedia again with
the gates, or the shared expert, put back to their state after dbpedia. Prints a table, writes JSON.

    python benchmarks/forgetting_source.py [--data ../shared/data/mtl5]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moecl.config import config_from_dict
from moecl.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mtl5"))
    parser.add_argument("--out", default="benchmarks/results/forgetting_source.json")
    args = parser.parse_args()
    cfg = config_from_dict({
        "backbone": "smollm2-135m-instruct", "method": "moecl",
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "max_length": 128, "max_per_label": 8, "seed": 0},
        "eval": {"max_per_label": 6, "batch_size": 8},
        "tasks": [{"name": t, "data": str(Path(args.data) / t)} for t in ("dbpedia", "amazon")],
    })
    trainer = Trainer(cfg, "runs/forgetting_source")
    model = trainer.model
    first, second = trainer.tasks
    torch.manual_seed(0)
    model.add_task(first.name, first.labels)
    trainer.train_stage([first], [], 0)
    results = {"dbpedia after dbpedia": trainer.evaluate(first)}
    parts = {"gates": ".gate.", "shared expert": ".experts.shared."}
    after_first = {k: v.clone() for k, v in model.state_dict().items() if any(p in k for p in parts.values())}
    torch.manual_seed(1)
    model.add_task(second.name, second.labels)
    trainer.train_stage([second], [first], 1)
    results["dbpedia after amazon"] = trainer.evaluate(first)
    after_second = {k: v.clone() for k, v in model.state_dict().items() if k in after_first}
    for name, marker in parts.items():
        model.load_state_dict({k: (after_first[k] if marker in k else after_second[k]) for k in after_first}, strict=False)
        results[f"dbpedia after amazon, {name} as after dbpedia"] = trainer.evaluate(first)
    print("\n| dbpedia accuracy | value |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {100 * value:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
