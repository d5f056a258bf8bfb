"""`moecl` command line: train a continual run, predict with a trained checkpoint."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_config
from .data import DataError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError)


def _train(args) -> int:
    from .trainer import ResumeError, Trainer

    try:
        cfg = load_config(args.config)
        trainer = Trainer(cfg, args.out)
        metrics = trainer.run(resume=args.resume)
    except (*USER_ERRORS, ResumeError, ValueError) as err:
        print(f"moecl: error: {err}", file=sys.stderr)
        return 2
    bwt = "n/a" if metrics["bwt"] is None else f"{100 * metrics['bwt']:.1f}"
    print(f"AA {100 * metrics['aa']:.1f}  BWT {bwt}  -> {args.out}/metrics.json")
    return 0


def _predict(args) -> int:
    from .checkpoint import load_model
    from .scoring import predict

    try:
        model, prompts, _ = load_model(args.model)
    except USER_ERRORS as err:
        print(f"moecl: error: {err}", file=sys.stderr)
        return 2
    if args.task not in prompts:
        print(f"moecl: error: task '{args.task}' is not in {args.model} (tasks: {', '.join(prompts)})", file=sys.stderr)
        return 2
    prompt = prompts[args.task]
    for index in predict(model, prompt, args.texts, batch_size=8):
        print(prompt.labels[index])
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="moecl", description="Continual instruction tuning with MoE-CL")
    commands = root.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train every task of CONFIG in order; writes DIR/metrics.json")
    train.add_argument("config")
    train.add_argument("--out", required=True, help="run folder (checkpoint, metrics.json, heatmap.png)")
    train.add_argument("--resume", action="store_true", help="continue from the last complete task in --out")
    train.set_defaults(run=_train)
    pred = commands.add_parser("predict", help="print one predicted label per TEXT")
    pred.add_argument("--model", required=True, help="a run folder or its checkpoint folder")
    pred.add_argument("--task", required=True)
    pred.add_argument("texts", nargs="+", metavar="TEXT")
    pred.set_defaults(run=_predict)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
