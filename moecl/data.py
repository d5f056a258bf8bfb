"""Task datasets: a folder with `train.jsonl`, `test.jsonl` (`text`, `label`) and `labels.json`.

Everything is checked on load, so bad data stops a run before training with the file, the line
and the rule named.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")


class DataError(ValueError):
    """Data that cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    task: str


@dataclass
class TaskData:
    name: str
    folder: Path
    labels: list[str]
    train: list[Example]
    test: list[Example]
    version: str  # content hash of the folder's files

    @property
    def chance(self) -> float:
        return 1.0 / len(self.labels)


def folder_hash(folder: Path) -> str:
    """sha256 over the task's files (names and bytes), so any edit makes a new version."""
    digest = hashlib.sha256()
    for name in ("labels.json", *(f"{s}.jsonl" for s in SPLITS)):
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()


def _read_labels(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        labels = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise DataError(f"{path}: must be a non-empty JSON list of non-empty label strings")
    if len(set(labels)) != len(labels):
        raise DataError(f"{path}: label names must be unique")
    return labels


def _read_split(path: Path, task: str, labels: list[str]) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    index = {label: i for i, label in enumerate(labels)}
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON: {err}") from None
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise DataError(f"{path}:{number}: each line must be an object with 'text' and 'label'")
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise DataError(f"{path}:{number}: 'text' must be a non-empty string")
            if row["label"] not in index:
                raise DataError(f"{path}:{number}: label {row['label']!r} is not in labels.json")
            examples.append(Example(row["text"], index[row["label"]], task))
    if not examples:
        raise DataError(f"{path}: the split is empty")
    return examples


def load_task(name: str, folder: str | Path) -> TaskData:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: task folder for '{name}' not found")
    labels = _read_labels(folder / "labels.json")
    splits = {s: _read_split(folder / f"{s}.jsonl", name, labels) for s in SPLITS}
    return TaskData(name, folder, labels, splits["train"], splits["test"], folder_hash(folder))


def per_label(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """At most `limit` examples of each label, drawn reproducibly; the order is shuffled."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    if limit is None:
        return shuffled
    taken: dict[int, int] = {}
    kept = []
    for example in shuffled:
        if taken.get(example.label, 0) < limit:
            taken[example.label] = taken.get(example.label, 0) + 1
            kept.append(example)
    return kept
