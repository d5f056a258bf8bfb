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
from collections.abc import Iterable
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
    # A known task's label set may change (labels added, removed or reordered): the task is then
    # retrained with the new set and the champion is scored on its names. Off by default, because
    # every consumer of the served labels sees the change.
    allow_label_change: bool = False


# For each rule, the stricter of two values: a run may tighten the deployed rules, never loosen them.
STRICTER = {"min_rows_per_label_train": max, "min_rows_per_label_test": max, "min_text_chars": max,
            "max_text_chars": min, "allow_label_change": min}

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
    new task); ``labels.json`` must then list exactly the same names in the same order, unless
    ``rules.allow_label_change``.
    """
    task_dir = Path(task_dir)
    paths = {name: task_dir / name for name in (LABELS_FILE, TRAIN_FILE, TEST_FILE)}
    failures = _check_files_exist(paths.values())
    if failures:
        return _report(task_dir, failures, {})

    labels, failures = _read_labels(paths[LABELS_FILE])
    if labels is not None and expected_labels is not None and not rules.allow_label_change:
        failures += _check_label_set(paths[LABELS_FILE], labels, list(expected_labels))
    frames = {}
    for split, name in SPLIT_FILES.items():
        frames[split], line_failures = _read_split(paths[name])
        failures += line_failures
    if labels is None:  # GX needs the label names; report what the Python checks found
        return _report(task_dir, failures, {})

    gx_results, gx_failures = _run_expectations(frames, labels, rules, paths)
    return _report(task_dir, failures + gx_failures, gx_results)


def _report(task_dir: Path, failures: list[Failure], gx_results: dict) -> ValidationReport:
    return ValidationReport(str(task_dir), not failures, failures, gx_results)


# --- plain-Python checks that must hold before GX can run -------------------------------


def _check_files_exist(paths: Iterable[Path]) -> list[Failure]:
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
        detail = f"line {first_number} is {first_problem}"
        if len(bad_lines) > 1:
            detail = f"{len(bad_lines)} lines are not JSON objects; first: {detail}"
        rows = [number for number, _ in bad_lines[:MAX_LISTED_ROWS]]
        failures.append(Failure(str(path), "valid_json", rows, detail))
    return _split_frame(records, line_numbers), failures


def _split_frame(records: list[dict], line_numbers: list[int]) -> pd.DataFrame:
    """Build the DataFrame GX checks: the line number plus the required columns.

    Values stay ``object`` dtype so a non-string text reaches the type check as it was
    written. A required column is absent only when no line has the key, which is what
    ``required_columns`` reports; a key missing on some lines shows up as a null there.
    """
    frame = pd.DataFrame({ROW: pd.Series(line_numbers, dtype="int64")})
    for column in REQUIRED_COLUMNS:
        if not records or any(column in record for record in records):
            frame[column] = pd.Series([record.get(column) for record in records], dtype=object)
    return frame


def _check_label_set(path: Path, labels: list[str], expected: list[str]) -> list[Failure]:
    """The champion model maps outputs to label names by position, so any change breaks it."""
    if labels == expected:
        return []
    added = [label for label in labels if label not in expected]
    removed = [label for label in expected if label not in labels]
    changes = [f"added {_quote(added)}"] if added else []
    changes += [f"removed {_quote(removed)}"] if removed else []
    detail = f"labels {labels} differ from the champion's {expected}: "
    detail += "; ".join(changes) if changes else "same names in a different order"
    return [Failure(str(path), "label_set_unchanged", [], detail)]


# --- GX checks on the rows of each split -------------------------------------------------

# GX returns expectation results in its own order; failures are listed in this one.
RULE_ORDER = (
    "required_columns",
    "text_not_null",
    "text_is_string",
    "text_not_empty",
    "text_length",
    "unique_text",
    "test_text_not_in_train",
    "label_not_null",
    "label_in_labels_json",
    "min_rows_per_label",
)

FIXED_MESSAGES = {
    "text_not_null": "text is missing or null",
    "text_is_string": "text is not a string",
    "text_not_empty": "text is empty or only whitespace",
    "unique_text": "the same text appears on more than one line",
    "test_text_not_in_train": f"text also appears in {TRAIN_FILE}",
    "label_not_null": "label is missing or null",
}


def _run_expectations(
    frames: dict[str, pd.DataFrame], labels: list[str], rules: ValidationRules, paths: dict
) -> tuple[dict[str, Any], list[Failure]]:
    """Validate the rows and the per-label row counts of both splits with GX."""
    source = _gx_context().data_sources.add_pandas("moecl_task")
    minimum = {"train": rules.min_rows_per_label_train, "test": rules.min_rows_per_label_test}
    frames = {**frames, "test": _mark_train_overlap(frames["test"], frames["train"])}

    gx_results, failures = {}, []
    for split, name in SPLIT_FILES.items():
        frame = frames[split]
        rows = _validate(source, split, frame, _row_suite(split, frame, labels, rules), ROW)
        counts = _validate(
            source,
            f"{split}_label_counts",
            _label_counts(frame, labels),
            _count_suite(split, minimum[split]),
            LABEL,
        )
        gx_results[split] = {"rows": rows.to_json_dict(), "label_counts": counts.to_json_dict()}
        found = _failures_from(str(paths[name]), rows) + _failures_from(str(paths[name]), counts)
        failures += sorted(found, key=lambda failure: RULE_ORDER.index(failure.rule))
    return gx_results, failures


def _gx_context():
    """A fresh in-memory GX context per call (about 15 ms), so calls never share batches.

    Progress bars are switched off: they only clutter pipeline logs.
    """
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _mark_train_overlap(test: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Add a boolean column saying whether each test text is also a train text.

    Membership is computed here rather than passed to GX as a value set, because a value
    set would copy every train text into the GX results and bloat the report.
    """
    if TEXT not in test or TEXT not in train:
        return test
    train_texts = {text for text in train[TEXT] if isinstance(text, str)}
    in_train = [isinstance(text, str) and text in train_texts for text in test[TEXT]]
    return test.assign(**{IN_TRAIN: pd.Series(in_train, index=test.index, dtype=bool)})


def _label_counts(frame: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """One row per label of labels.json with its number of rows, zero when it has none."""
    present = frame[LABEL] if LABEL in frame else []
    counts = {label: 0 for label in labels}
    for label in present:
        if isinstance(label, str) and label in counts:
            counts[label] += 1
    return pd.DataFrame(
        {LABEL: list(counts), ROW_COUNT: pd.Series(list(counts.values()), dtype="int64")}
    )


def _row_suite(
    split: str, frame: pd.DataFrame, labels: list[str], rules: ValidationRules
) -> gx.ExpectationSuite:
    """Expectations on one split's rows; a missing column only gets its existence check."""
    expectations = [
        gxe.ExpectColumnToExist(column=column, meta=_rule("required_columns"))
        for column in REQUIRED_COLUMNS
    ]
    if TEXT in frame:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column=TEXT, meta=_rule("text_not_null")),
            gxe.ExpectColumnValuesToBeOfType(
                column=TEXT, type_="str", meta=_rule("text_is_string")
            ),
            gxe.ExpectColumnValuesToMatchRegex(
                column=TEXT, regex=r"\S", meta=_rule("text_not_empty")
            ),
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=TEXT,
                min_value=rules.min_text_chars,
                max_value=rules.max_text_chars,
                meta=_rule("text_length"),
            ),
            gxe.ExpectColumnValuesToBeUnique(column=TEXT, meta=_rule("unique_text")),
        ]
    if IN_TRAIN in frame:
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column=IN_TRAIN, value_set=[False], meta=_rule("test_text_not_in_train")
            )
        )
    if LABEL in frame:
        expectations += [
            gxe.ExpectColumnValuesToNotBeNull(column=LABEL, meta=_rule("label_not_null")),
            gxe.ExpectColumnValuesToBeInSet(
                column=LABEL, value_set=labels, meta=_rule("label_in_labels_json")
            ),
        ]
    return gx.ExpectationSuite(name=f"{split}_rows", expectations=expectations)


def _count_suite(split: str, minimum: int) -> gx.ExpectationSuite:
    expectation = gxe.ExpectColumnValuesToBeBetween(
        column=ROW_COUNT, min_value=minimum, meta=_rule("min_rows_per_label")
    )
    return gx.ExpectationSuite(name=f"{split}_label_counts", expectations=[expectation])


def _rule(name: str) -> dict[str, str]:
    """Expectation meta naming our rule, so each GX result maps back to a Failure."""
    return {"rule": name}


def _validate(
    source, name: str, frame: pd.DataFrame, suite: gx.ExpectationSuite, index_column: str
):
    """Validate a DataFrame, keeping up to 20 offending rows identified by ``index_column``."""
    batch = (
        source.add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": MAX_LISTED_ROWS,
        "unexpected_index_column_names": [index_column],
    }
    return batch.validate(suite, result_format=result_format)


def _failures_from(file: str, suite_result) -> list[Failure]:
    """Turn the failed expectations of a GX suite result into Failures for ``file``."""
    failures = []
    for outcome in suite_result.results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        rule = config.meta["rule"]
        errors = _exception_messages(outcome.exception_info)
        if errors:
            failures.append(Failure(file, rule, [], f"GX could not run the check: {errors[0]}"))
            continue
        found = outcome.result.get("partial_unexpected_index_list") or []
        rows = sorted(int(entry[ROW]) for entry in found if ROW in entry)
        total = outcome.result.get("unexpected_count") or 0
        detail = _describe(rule, config.kwargs, found)
        if total > len(found):
            detail += f" ({total} in total, first {len(found)} listed)"
        failures.append(Failure(file, rule, rows, detail))
    return failures


def _exception_messages(exception_info: dict | None) -> list[str]:
    """GX reports errors either flat or keyed by metric; collect the messages of either."""
    if not exception_info:
        return []
    entries = [exception_info] if "raised_exception" in exception_info else exception_info.values()
    return [entry["exception_message"] for entry in entries if entry.get("raised_exception")]


def _describe(rule: str, kwargs: dict, found: list[dict]) -> str:
    """Explain a failed rule in words, naming the offending values where that helps."""
    if rule in FIXED_MESSAGES:
        return FIXED_MESSAGES[rule]
    if rule == "required_columns":
        return f"column '{kwargs['column']}' is missing"
    if rule == "text_length":
        return f"text length is outside [{kwargs['min_value']}, {kwargs['max_value']}] characters"
    if rule == "label_in_labels_json":
        values = list(dict.fromkeys(repr(entry[LABEL]) for entry in found))
        noun, verb = ("label", "is") if len(values) == 1 else ("labels", "are")
        return f"{noun} {', '.join(values)} {verb} not in {LABELS_FILE}"
    if rule == "min_rows_per_label":
        counts = ", ".join(f"{entry[LABEL]!r} has {entry[ROW_COUNT]}" for entry in found)
        return f"fewer than {kwargs['min_value']:g} rows for a label: {counts}"
    raise ValueError(f"no description for rule {rule!r}")


def _quote(values: list[str]) -> str:
    return ", ".join(map(repr, values))
