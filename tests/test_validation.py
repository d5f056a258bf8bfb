"""Tests for moecl.mlops.validation: each rule must fail on bad data and name file, rule and rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moecl.mlops.validation import (
    DataValidationError,
    Failure,
    ValidationReport,
    ValidationRules,
    validate_task,
)

AGNEWS = Path("/work/shared/data/mtl5/agnews")
LABELS = ["A", "B"]


def clean_rows(split: str, per_label: int, labels: list[str] = LABELS) -> list[dict]:
    """Rows with unique texts (also unique across splits) and `per_label` rows per label."""
    return [
        {"text": f"{split} example {i} of {label}", "label": label}
        for i in range(per_label)
        for label in labels
    ]


def write_task(
    task_dir: Path,
    train: list | None = None,
    test: list | None = None,
    labels: object = LABELS,
) -> Path:
    """Write a task folder; rows are dicts (written as JSON) or raw strings (written as is).

    By default the folder is clean: 8 train and 4 test rows per label, the default minimums.
    """
    task_dir.mkdir(parents=True, exist_ok=True)
    splits = {
        "train.jsonl": clean_rows("train", 8) if train is None else train,
        "test.jsonl": clean_rows("test", 4) if test is None else test,
    }
    for name, rows in splits.items():
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        (task_dir / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (task_dir / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return task_dir


def with_row(rows: list, line: int, row: dict | str) -> list:
    """Insert `row` so that it ends up on 1-based `line`."""
    return rows[: line - 1] + [row] + rows[line - 1 :]


def rules_of(report: ValidationReport) -> set[str]:
    return {failure.rule for failure in report.failures}


def only_failure(report: ValidationReport, rule: str) -> Failure:
    matches = [failure for failure in report.failures if failure.rule == rule]
    assert len(matches) == 1, report.summary()
    return matches[0]


def test_clean_folder_passes(tmp_path):
    report = validate_task(write_task(tmp_path))
    assert report.success, report.summary()
    assert report.failures == []
    assert report.summary() == f"{tmp_path}: all validation checks passed"
    report.raise_for_failures()
    for split in ("train", "test"):
        assert report.gx_results[split]["rows"]["success"] is True
        assert report.gx_results[split]["label_counts"]["success"] is True


def test_label_outside_labels_json(tmp_path):
    train = with_row(clean_rows("train", 8), 3, {"text": "buy now", "label": "Spam"})
    report = validate_task(write_task(tmp_path, train=train))
    assert not report.success
    assert rules_of(report) == {"label_in_labels_json"}
    failure = only_failure(report, "label_in_labels_json")
    assert failure.file == str(tmp_path / "train.jsonl")
    assert failure.rows == [3]
    assert report.summary() == (
        f"{tmp_path / 'train.jsonl'}: row 3: rule label_in_labels_json: "
        "label 'Spam' is not in labels.json"
    )


def test_several_bad_labels_are_listed_in_line_order(tmp_path):
    train = clean_rows("train", 8)
    train = with_row(train, 3, {"text": "x1", "label": "Spam"})
    train = with_row(train, 17, {"text": "x2", "label": "Ham"})
    failure = only_failure(validate_task(write_task(tmp_path, train=train)), "label_in_labels_json")
    assert failure.rows == [3, 17]
    assert failure.detail == "labels 'Spam', 'Ham' are not in labels.json"
    assert failure.describe().startswith(f"{tmp_path / 'train.jsonl'}: rows 3, 17: rule ")


def test_row_list_is_capped_at_20(tmp_path):
    spam = [{"text": f"spam {i}", "label": "Spam"} for i in range(25)]
    report = validate_task(write_task(tmp_path, train=clean_rows("train", 8) + spam))
    failure = only_failure(report, "label_in_labels_json")
    assert failure.rows == list(range(17, 37))
    assert "(25 in total, first 20 listed)" in failure.detail


@pytest.mark.parametrize(
    ("text", "expected_rules"),
    [("   ", {"text_not_empty"}), ("", {"text_not_empty", "text_length"})],
)
def test_empty_text(tmp_path, text, expected_rules):
    test = with_row(clean_rows("test", 4), 5, {"text": text, "label": "A"})
    report = validate_task(write_task(tmp_path, test=test))
    assert rules_of(report) == expected_rules
    for rule in expected_rules:
        failure = only_failure(report, rule)
        assert failure.file == str(tmp_path / "test.jsonl")
        assert failure.rows == [5]


def test_text_longer_than_maximum(tmp_path):
    rules = ValidationRules(max_text_chars=40)
    train = with_row(clean_rows("train", 8), 2, {"text": "x" * 41, "label": "B"})
    report = validate_task(write_task(tmp_path, train=train), rules)
    assert rules_of(report) == {"text_length"}
    failure = only_failure(report, "text_length")
    assert failure.rows == [2]
    assert "[1, 40]" in failure.detail


def test_missing_or_non_string_text_and_null_label(tmp_path):
    train = clean_rows("train", 8)
    train = with_row(train, 2, {"label": "A"})
    train = with_row(train, 4, {"text": 123, "label": "A"})
    train = with_row(train, 6, {"text": "no label here", "label": None})
    report = validate_task(write_task(tmp_path, train=train))
    assert rules_of(report) == {"text_not_null", "text_is_string", "label_not_null"}
    assert only_failure(report, "text_not_null").rows == [2]
    assert only_failure(report, "text_is_string").rows == [4]
    assert only_failure(report, "label_not_null").rows == [6]


def test_duplicate_text_within_a_split(tmp_path):
    train = clean_rows("train", 8)
    train = with_row(train, 10, dict(train[1]))  # line 2's row again on line 10
    report = validate_task(write_task(tmp_path, train=train))
    assert rules_of(report) == {"unique_text"}
    failure = only_failure(report, "unique_text")
    assert failure.file == str(tmp_path / "train.jsonl")
    assert failure.rows == [2, 10]


def test_test_text_present_in_train(tmp_path):
    train = clean_rows("train", 8)
    test = with_row(clean_rows("test", 4), 3, {"text": train[3]["text"], "label": "B"})
    report = validate_task(write_task(tmp_path, train=train, test=test))
    assert rules_of(report) == {"test_text_not_in_train"}
    failure = only_failure(report, "test_text_not_in_train")
    assert failure.file == str(tmp_path / "test.jsonl")
    assert failure.rows == [3]


def test_too_few_rows_for_a_label(tmp_path):
    train = [row for row in clean_rows("train", 8) if row["label"] == "A"]
    train += [{"text": f"few {i}", "label": "B"} for i in range(3)]
    report = validate_task(write_task(tmp_path, train=train))
    assert rules_of(report) == {"min_rows_per_label"}
    failure = only_failure(report, "min_rows_per_label")
    assert failure.file == str(tmp_path / "train.jsonl")
    assert failure.rows == []
    assert failure.detail == "fewer than 8 rows for a label: 'B' has 3"


def test_label_without_rows_fails_in_both_splits(tmp_path):
    report = validate_task(write_task(tmp_path, labels=["A", "B", "C"]))
    assert rules_of(report) == {"min_rows_per_label"}
    files = {failure.file: failure.detail for failure in report.failures}
    assert files == {
        str(tmp_path / "train.jsonl"): "fewer than 8 rows for a label: 'C' has 0",
        str(tmp_path / "test.jsonl"): "fewer than 4 rows for a label: 'C' has 0",
    }


def test_minimum_rows_come_from_the_rules(tmp_path):
    task = write_task(tmp_path)
    rules = ValidationRules(min_rows_per_label_train=9, min_rows_per_label_test=4)
    failure = only_failure(validate_task(task, rules), "min_rows_per_label")
    assert failure.file == str(tmp_path / "train.jsonl")
    assert failure.detail == "fewer than 9 rows for a label: 'A' has 8, 'B' has 8"


@pytest.mark.parametrize("name", ["train.jsonl", "test.jsonl", "labels.json"])
def test_missing_file(tmp_path, name):
    task = write_task(tmp_path)
    (task / name).unlink()
    report = validate_task(task)
    assert not report.success
    assert [(f.file, f.rule, f.rows) for f in report.failures] == [
        (str(task / name), "file_exists", [])
    ]
    assert report.gx_results == {}


def test_bad_json_lines(tmp_path):
    train = clean_rows("train", 8)
    train = with_row(train, 4, '{"text": "unterminated", ')
    train = with_row(train, 6, '["a JSON list", "A"]')
    report = validate_task(write_task(tmp_path, train=train))
    assert rules_of(report) == {"valid_json"}
    failure = only_failure(report, "valid_json")
    assert failure.file == str(tmp_path / "train.jsonl")
    assert failure.rows == [4, 6]
    assert failure.detail.startswith("2 lines are not JSON objects; first: line 4 is not valid")
    # The remaining lines are still checked by GX.
    assert report.gx_results["train"]["rows"]["success"] is True


def test_bad_json_line_does_not_hide_row_failures(tmp_path):
    train = with_row(clean_rows("train", 8), 2, "not json")
    train = with_row(train, 5, {"text": "x", "label": "Spam"})
    report = validate_task(write_task(tmp_path, train=train))
    assert rules_of(report) == {"valid_json", "label_in_labels_json"}
    assert only_failure(report, "valid_json").rows == [2]
    assert only_failure(report, "label_in_labels_json").rows == [5]


def test_missing_required_column(tmp_path):
    train = [{"text": row["text"], "category": row["label"]} for row in clean_rows("train", 8)]
    report = validate_task(write_task(tmp_path, train=train))
    failure = only_failure(report, "required_columns")
    assert failure.file == str(tmp_path / "train.jsonl")
    assert failure.detail == "column 'label' is missing"


@pytest.mark.parametrize(
    "labels",
    [
        {"A": 0, "B": 1},
        [],
        ["A", "A", "B"],
        ["A", ""],
        ["A", 2],
    ],
)
def test_malformed_labels_file(tmp_path, labels):
    report = validate_task(write_task(tmp_path, labels=labels))
    assert [(f.file, f.rule) for f in report.failures] == [
        (str(tmp_path / "labels.json"), "labels_file")
    ]
    assert report.gx_results == {}


def test_labels_file_not_json(tmp_path):
    task = write_task(tmp_path)
    (task / "labels.json").write_text('["A", "B"', encoding="utf-8")
    report = validate_task(task)
    assert [(f.file, f.rule) for f in report.failures] == [
        (str(task / "labels.json"), "valid_json")
    ]


@pytest.mark.parametrize(
    ("expected", "detail_end"),
    [
        (["A", "B", "C"], "removed 'C'"),
        (["A"], "added 'B'"),
        (["B", "A"], "same names in a different order"),
    ],
)
def test_changed_label_set(tmp_path, expected, detail_end):
    report = validate_task(write_task(tmp_path), expected_labels=expected)
    assert rules_of(report) == {"label_set_unchanged"}
    failure = only_failure(report, "label_set_unchanged")
    assert failure.file == str(tmp_path / "labels.json")
    assert failure.detail.endswith(detail_end)


def test_a_changed_label_set_passes_when_the_rules_allow_it(tmp_path):
    task = write_task(tmp_path)
    assert not validate_task(task, expected_labels=["A", "C"]).success
    assert validate_task(task, ValidationRules(allow_label_change=True), expected_labels=["A", "C"]).success


def test_unchanged_label_set_passes(tmp_path):
    assert validate_task(write_task(tmp_path), expected_labels=["A", "B"]).success


def test_report_json_round_trips(tmp_path):
    train = with_row(clean_rows("train", 8), 3, {"text": "buy now", "label": "Spam"})
    report = validate_task(write_task(tmp_path / "task", train=train))
    loaded = json.loads(report.to_json())
    assert json.loads(json.dumps(loaded)) == loaded
    assert loaded["task_dir"] == str(tmp_path / "task")
    assert loaded["success"] is False
    assert loaded["failures"] == [
        {
            "file": str(tmp_path / "task" / "train.jsonl"),
            "rule": "label_in_labels_json",
            "rows": [3],
            "detail": "label 'Spam' is not in labels.json",
        }
    ]
    assert loaded["gx_results"]["train"]["rows"]["success"] is False
    out = tmp_path / "reports" / "validation.json"
    report.write_json(out)
    assert json.loads(out.read_text(encoding="utf-8")) == loaded


def test_raise_for_failures(tmp_path):
    train = with_row(clean_rows("train", 8), 3, {"text": "buy now", "label": "Spam"})
    report = validate_task(write_task(tmp_path, train=train))
    with pytest.raises(DataValidationError) as raised:
        report.raise_for_failures()
    assert isinstance(raised.value, ValueError)
    assert str(raised.value) == report.summary()


def test_real_mtl5_agnews_passes():
    labels = json.loads((AGNEWS / "labels.json").read_text(encoding="utf-8"))
    report = validate_task(AGNEWS, ValidationRules(), expected_labels=labels)
    assert report.success, report.summary()
    assert report.gx_results["test"]["rows"]["success"] is True
    json.dumps(report.gx_results)
