"""`moecl` command line: train a continual run, predict with a trained checkpoint. The commands that
drive the pipeline (trigger, watch, status, rollback) belong to it: `python -m pipelines`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, load_config
from .data import DataError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError)


def _train(args) -> int:
    from .manifest import read_manifest
    from .trainer import ResumeError, Trainer

    try:
        cfg = load_config(args.config)
        trainer = Trainer(cfg, args.out)
        metrics = trainer.extend(read_manifest(args.start)) if args.start else trainer.run(resume=args.resume)
    except (*USER_ERRORS, ResumeError, ValueError) as err:
        print(f"moecl: error: {err}", file=sys.stderr)
        return 2
    if not trainer.world.main:
        return 0
    bwt = "n/a" if metrics["bwt"] is None else f"{100 * metrics['bwt']:.1f}"
    print(f"AA {100 * metrics['aa']:.1f}  BWT {bwt}  -> {args.out}/metrics.json")
    return 0


def _predict(args) -> int:
    from .checkpoint import load_model
    from .scoring import answer

    try:
        model, prompts, _ = load_model(args.model)
        answers = answer(model, prompts, args.texts, [args.task] * len(args.texts))
    except (*USER_ERRORS, ValueError) as err:
        print(f"moecl: error: {err} ({args.model})", file=sys.stderr)
        return 2
    for task, label in answers:  # a text the router finds of no known task: "?" and no label
        print(label if args.task else f"{task or '?'}\t{label or ''}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="moecl", description="Continual instruction tuning with MoE-CL")
    commands = root.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train every task of CONFIG in order; writes DIR/metrics.json")
    train.add_argument("config")
    train.add_argument("--out", required=True, help="run folder (checkpoint, metrics.json, heatmap.png)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the last complete task in --out")
    start.add_argument("--from", dest="start", metavar="CHECKPOINT",
                       help="continue this trained model with the config's tasks it lacks or whose data changed")
    train.set_defaults(run=_train)
    pred = commands.add_parser("predict", help="print one predicted label per TEXT (TASK<tab>LABEL without --task; ?<tab> for a text of no known task)")
    pred.add_argument("--model", required=True, help="a run folder or its checkpoint folder")
    pred.add_argument("--task", help="the texts' task; without it each text is routed to a task first")
    pred.add_argument("texts", nargs="+", metavar="TEXT")
    pred.set_defaults(run=_predict)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, the other processes log warnings only
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
