"""Validate a task folder with Great Expectations before it is used for training.

A task folder holds ``train.jsonl`` and ``test.jsonl`` (one ``{"text": ..., "label": ...}``
object per line) and ``labels.json`` (the ordered list of label names). A new version of a
task must pass these checks before continual instruction tuning touches it, because a bad
row silently degrades the model and a changed label set breaks the champion's label mapping.

Structural problems that Great Expectations cannot express (a missing file, a line that is
not a JSON object, a malformed ``labels.json``) are checked in plain Python first. The row
checks then run as GX expectations on pandas DataFrames with a 1-based ``row`` column, so
every failure can name the offending lines of the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

TRAIN_FILE = "train.jsonl"
TEST_FILE = "test.jsonl"
LABELS_FILE = "labels.json"
SPLIT_FILES = {"train": TRAIN_FILE, "test": TEST_FILE}

TEXT = "text"
LABEL = "label"
REQUIRED_COLUMNS = (TEXT, LABEL)
ROW = "row"
IN_TRAIN = "text_in_train"
ROW_COUNT = "row_count"

MAX_LISTED_ROWS = 20


class DataValidationError(ValueError):
    """Raised when a task folder fails validation; the message is the report summary."""


@dataclass(frozen=True)
class ValidationRules:
    """Thresholds for the row checks; frozen so a default instance can be shared safely."""

    min_rows_per_label_train: int = 8
    min_rows_per_label_test: int = 4
    min_text_chars: int = 1
    max_text_chars: int = 20000


@dataclass
class Failure:
    """One violated rule in one file, with the 1-based lines it concerns (at most 20)."""

    file: str
    rule: str
    rows: list[int]
    detail: str

    def describe(self) -> str:
        """One human-readable line, e.g. ``path: rows 3, 17: rule r: detail``."""
        parts = [self.file]
        if self.rows:
            noun = "row" if len(self.rows) == 1 else "rows"
            parts.append(f"{noun} {', '.join(map(str, self.rows))}")
        parts += [f"rule {self.rule}", self.detail]
        return ": ".join(parts)


@dataclass
class ValidationReport:
    """Outcome of validating one task folder, plus the raw GX results for auditing."""

    task_dir: str
    success: bool
    failures: list[Failure]
    gx_results: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per failure, or a single line saying that every check passed."""
        if self.success:
            return f"{self.task_dir}: all validation checks passed"
        return "\n".join(failure.describe() for failure in self.failures)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def write_json(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")

    def raise_for_failures(self) -> None:
        """Stop a pipeline step on bad data, carrying the summary as the message."""
        if not self.success:
            raise DataValidationError(self.summary())


def validate_task(
    task_dir: str | Path,
    rules: ValidationRules = ValidationRules(),
    expected_labels: list[str] | None = None,
) -> ValidationReport:
    """Validate a task folder.

    ``expected_labels`` is this task's label list in the current champion model (None for a
    new task); ``labels.json`` must then list exactly the same names in the same order.
    """
    task_dir = Path(task_dir)
    paths = {name: task_dir / name for name in (LABELS_FILE, TRAIN_FILE, TEST_FILE)}
    failures = _check_files_exist(paths.values())
    if failures:
        return _report(task_dir, failures, {})

    labels, failures = _read_labels(paths[LABELS_FILE])
    frames = {}
    for split, name in SPLIT_FILES.items():
        frames[split], line_failures = _read_split(paths[name])
        failures += line_failures
    if labels is None:
        return _report(task_dir, failures, {})

    if expected_labels is not None:
        failures += _check_label_set(paths[LABELS_FILE], labels, list(expected_labels))
    gx_results, gx_failures = _run_expectations(frames, labels, rules, paths)
    return _report(task_dir, failures + gx_failures, gx_results)


def _report(task_dir: Path, failures: list[Failure], gx_results: dict) -> ValidationReport:
    return ValidationReport(str(task_dir), not failures, failures, gx_results)


# --- plain-Python checks that must hold before GX can run -------------------------------


def _check_files_exist(paths) -> list[Failure]:
    return [
        Failure(str(path), "file_exists", [], "file is missing")
        for path in paths
        if not path.is_file()
    ]


def _read_labels(path: Path) -> tuple[list[str] | None, list[Failure]]:
    """Load labels.json; return None as the labels if it is not a list of unique names."""
    try:
        labels = json.loads(path.read_bytes())
    except ValueError as error:
        return None, [Failure(str(path), "valid_json", [], f"not valid JSON: {error}")]

    if not isinstance(labels, list) or not labels:
        problem = "must be a non-empty JSON list of label names"
    elif bad := [repr(x) for x in labels if not isinstance(x, str) or not x.strip()]:
        problem = f"label names must be non-empty strings, got {', '.join(bad)}"
    elif repeated := sorted({x for x in labels if labels.count(x) > 1}):
        problem = f"label names must be unique, repeated: {', '.join(map(repr, repeated))}"
    else:
        return labels, []
    return None, [Failure(str(path), "labels_file", [], problem)]


def _read_split(path: Path) -> tuple[pd.DataFrame, list[Failure]]:
    """Parse a JSONL file into a DataFrame of its JSON-object lines, keyed by line number.

    Lines that are not JSON objects are reported and left out, so the GX checks still run on
    the rest and the report lists every problem at once.
    """
    records, line_numbers, bad_lines = [], [], []
    # bytes.splitlines() breaks only on \n, \r and \r\n, never on the Unicode line
    # separators that JSON strings may legally contain unescaped.
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError as error:  # also covers invalid UTF-8
            bad_lines.append((number, f"not valid JSON ({error})"))
            continue
        if not isinstance(record, dict):
            bad_lines.append((number, f"a JSON {type(record).__name__}, not an object"))
            continue
        records.append(record)
        line_numbers.append(number)

    failures = []
    if bad_lines:
        first_number, first_problem = bad_lines[0]
        detail = f"line {first_number} is {first_problem}" + _more(len(bad_lines), 1, "lines")
        rows = [number for number, _ in bad_lines[:MAX_LISTED_ROWS]]
        failures.append(Failure(str(path), "valid_json", rows, detail))
    return _split_frame(records, line_numbers), failures
