"""The keys under which a model's recorded answers are reused instead of scored again.

An answer depends on the model (the tensors the task's answers read, its labels, the precision it
runs in), on the examples and scoring settings, and on the code that turns a checkpoint and a text
into an answer: a changed prompt rendering, forward or label scoring would otherwise leave a champion
judged on answers it no longer gives. The code's digest covers its source and the versions of the
libraries it runs on. Nothing here imports torch: steps that do not score compute these keys too."""
from __future__ import annotations

import functools
import hashlib
import json
from importlib import metadata
from pathlib import Path

ANSWERING_MODULES = ("backbone", "checkpoint", "experts", "methods", "model", "prompts", "scoring")
ANSWERING_LIBRARIES = ("torch", "transformers")
ANSWERS_FILE = "answers.json"  # beside a checkpoint's manifest: the answers its run scored, by task


@functools.cache
def answering_code_digest() -> str:
    package, digest = Path(__file__).parent, hashlib.sha256()
    for name in ANSWERING_MODULES:
        digest.update((package / f"{name}.py").read_bytes())
    for library in ANSWERING_LIBRARIES:
        digest.update(f"{library}=={metadata.version(library)}".encode())
    return digest.hexdigest()


def examples_key(task: str, labels: list[str], examples, settings) -> str:
    """What a task's answers depend on besides the model: its test examples (text and label name),
    the scoring settings of `settings` (a Config) and the answering code."""
    payload = {"task": task, "examples": [[e.text, labels[e.label]] for e in examples], "backbone": settings.backbone,
               "max_length": settings.train.max_length, "batch_size": settings.eval.batch_size,
               "code": answering_code_digest()}
    return _digest(payload)


def model_key(model, task: str, labels: list[str] | None = None) -> str:
    """What a task's answers depend on in the model: the tensors they read (`scoring_digest`), the
    task's labels (default: the model's; the bare backbone is scored before it holds the task) and
    the precision the model computes in."""
    labels = model.labels[task] if labels is None else labels
    return _digest({"tensors": model.scoring_digest(task), "labels": labels, "precision": model.precision})


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
