"""The bad-data battery: every broken data version is refused by the real validation step (DVC
remote, Great Expectations) before training, naming its file and rule, and leaves the registry as
it was. The README lists the cases."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from moecl.checkpoint import load_model
from moecl.config import config_from_dict
from moecl.data import load_task, per_label
from moecl.manifest import read_manifest
from moecl.mlops import lifecycle, registry, steps
from moecl.mlops.versioning import DataVersion, _object_path, init_project, snapshot, task_versions
from moecl.scoring import predict
from moecl.trainer import Trainer

from .conftest import write_task

RULES = {"min_rows_per_label_train": 4, "min_rows_per_label_test": 2, "max_text_chars": 2000}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _edit_row(split: str, change):
    def mutate(data: Path) -> None:
        rows = _lines(data / "topics" / f"{split}.jsonl")
        rows[2] = change(rows[2])
        _write(data / "topics" / f"{split}.jsonl", rows)
    return mutate


def _append_line(split: str, line: bytes):
    def mutate(data: Path) -> None:
        with open(data / "topics" / f"{split}.jsonl", "ab") as handle:
            handle.write(line + b"\n")
    return mutate


def _replace_file(name: str, content: bytes | None):
    def mutate(data: Path) -> None:
        path = data / "topics" / name
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
    return mutate


def _leak(data: Path) -> None:
    test = _lines(data / "topics" / "test.jsonl")
    _write(data / "topics" / "train.jsonl", _lines(data / "topics" / "train.jsonl") + [test[0]])


def _duplicate(data: Path) -> None:
    train = _lines(data / "topics" / "train.jsonl")
    _write(data / "topics" / "train.jsonl", train + [train[0]])


def _too_few(split: str, keep: int):
    def mutate(data: Path) -> None:
        rows = _lines(data / "topics" / f"{split}.jsonl")
        sports = [r for r in rows if r["label"] == "sports"][:keep]
        _write(data / "topics" / f"{split}.jsonl", [r for r in rows if r["label"] != "sports"] + sports)
    return mutate


def _rename_folder(name: str):
    def mutate(data: Path) -> None:
        shutil.copytree(data / "sentiment", data / name)
    return mutate


# (case, mutation of the good data folder, text the refusal must name: file and rule)
CASES = [
    ("bad JSON line", _append_line("train", b'{"text": "sports sports", "label": '), ("topics/train.jsonl", "valid_json")),
    ("a line that is a list", _append_line("train", b'["sports", "sports"]'), ("topics/train.jsonl", "valid_json")),
    ("non-UTF-8 bytes", _append_line("train", b'{"text": "caf\xe9 sports", "label": "sports"}'),
     ("topics/train.jsonl", "valid_json")),
    ("missing text key", _edit_row("train", lambda r: {"label": r["label"]}), ("topics/train.jsonl", "text_not_null")),
    ("missing label key", _edit_row("train", lambda r: {"text": r["text"]}), ("topics/train.jsonl", "label_not_null")),
    ("text is a number", _edit_row("train", lambda r: {**r, "text": 42}), ("topics/train.jsonl", "text_is_string")),
    ("label is a list", _edit_row("test", lambda r: {**r, "label": ["sports"]}), ("topics/test.jsonl", "label_in_labels_json")),
    ("empty text", _edit_row("train", lambda r: {**r, "text": "   "}), ("topics/train.jsonl", "text_not_empty")),
    ("oversized text", _edit_row("train", lambda r: {**r, "text": "sports " * 400}), ("topics/train.jsonl", "text_length")),
    ("unknown label", _edit_row("train", lambda r: {**r, "label": "cooking"}), ("topics/train.jsonl", "label_in_labels_json")),
    ("test text in train", _leak, ("topics/test.jsonl", "test_text_not_in_train")),
    ("duplicate texts", _duplicate, ("topics/train.jsonl", "unique_text")),
    ("too few train rows for a label", _too_few("train", 2), ("topics/train.jsonl", "min_rows_per_label")),
    ("too few test rows for a label", _too_few("test", 1), ("topics/test.jsonl", "min_rows_per_label")),
    ("missing test.jsonl", _replace_file("test.jsonl", None), ("topics/test.jsonl", "file_exists")),
    ("empty train.jsonl", _replace_file("train.jsonl", b""), ("topics/train.jsonl", "min_rows_per_label")),
    ("missing labels.json", _replace_file("labels.json", None), ("topics/labels.json", "file_exists")),
    ("labels.json not JSON", _replace_file("labels.json", b"sports, science"), ("topics/labels.json", "valid_json")),
    ("labels.json empty list", _replace_file("labels.json", b"[]"), ("topics/labels.json", "labels_file")),
    ("labels.json duplicates", _replace_file("labels.json", b'["sports", "sports", "science"]'),
     ("topics/labels.json", "labels_file")),
    ("known task's labels changed", _replace_file("labels.json", b'["sports", "science", "economy"]'),
     ("topics/labels.json", "label_set_unchanged")),
    ("champion task folder removed", lambda data: shutil.rmtree(data / "sentiment"), ("sentiment", "champion_tasks_present")),
    ("task folder name with a space", _rename_folder("bad name"), ("bad name", "task_name")),
    ("task folder named 'shared'", _rename_folder("shared"), ("shared", "task_name")),
]


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A DVC project whose good data version is the registry's champion (a tiny model trained on it)."""
    root = tmp_path_factory.mktemp("battery")
    project = init_project(root / "project", root / "remote")
    write_task(project / "data" / "topics", ["sports", "science", "politics"])
    write_task(project / "data" / "sentiment", ["bad", "good"], salt="review ")
    shutil.copytree(project / "data", root / "good")
    version = snapshot(project)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    settings = {"backbone": "tiny-random-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "train": {"epochs": 1, "batch_size": 8, "max_length": 64}, "eval": {"routing": False},
                "router": {"fit_per_task": 0}}
    cfg = config_from_dict({**settings, "tasks": [{"name": t, "data": str(project / "data" / t)} for t in ("topics", "sentiment")]})
    Trainer(cfg, root / "run").run()
    run_id, _ = lifecycle.claim(tracking_uri, version.hash, lifecycle.Policy(), str(root / "artifacts"))
    registered = registry.register(tracking_uri, "moecl", run_id, root / "run" / "checkpoint",
                                   {"task_versions": json.dumps(task_versions(version))})
    registry.promote(tracking_uri, "moecl", registered, None, "test", "good data")
    steps._end_run(tracking_uri, run_id, "promoted")
    return {"project": project, "good": root / "good", "tracking_uri": tracking_uri, "root": root, "settings": settings}


def _registry_state(tracking_uri: str):
    client = registry.connect(tracking_uri)
    versions = sorted(str(v.version) for v in client.search_model_versions("name='moecl'"))
    return versions, registry.alias_version(tracking_uri, "moecl", registry.CHAMPION)


def _refused(champion, version: DataVersion, expected: tuple[str, ...], tmp_path: Path) -> None:
    tracking_uri = champion["tracking_uri"]
    before = _registry_state(tracking_uri)
    run_id, _ = lifecycle.claim(tracking_uri, version.hash, lifecycle.Policy())
    assert run_id, "the bad version was not launched"
    with pytest.raises(steps.ValidationFailed) as refused:
        steps.validate(tracking_uri, "moecl", before[1], run_id, version.remote, version.hash, RULES,
                       str(tmp_path / "dataset"))
    for text in expected:
        assert text in str(refused.value), str(refused.value)
    assert _registry_state(tracking_uri) == before
    run = registry.connect(tracking_uri).get_run(run_id)
    assert run.data.tags[registry.TAG_OUTCOME] == "validation_failed"


@pytest.mark.parametrize("case, mutate, expected", CASES, ids=[c[0] for c in CASES])
def test_a_bad_data_version_is_refused_before_training(champion, case, mutate, expected, tmp_path):
    data = champion["project"] / "data"
    shutil.rmtree(data)
    shutil.copytree(champion["good"], data)
    mutate(data)
    _refused(champion, snapshot(champion["project"]), expected, tmp_path)


def _listing(champion, entries_bytes: bytes, stored: bytes | None = None) -> DataVersion:
    """A version whose `.dir` listing is `entries_bytes` (stored as `stored` if given)."""
    remote = str(champion["root"] / "remote")
    digest = hashlib.md5(entries_bytes).hexdigest()
    path = Path(_object_path(remote, digest) + ".dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stored if stored is not None else entries_bytes)
    return DataVersion(digest, remote)


def test_a_listing_that_escapes_the_dataset_folder_is_refused(champion, tmp_path):
    evil = json.dumps([{"md5": "0" * 32, "relpath": "../../outside.txt"}]).encode()
    _refused(champion, _listing(champion, evil), ("../../outside.txt", "not a plain path"), tmp_path)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path.parent / "outside.txt").exists()


def test_an_altered_listing_is_refused(champion, tmp_path):
    honest = json.dumps([{"md5": "0" * 32, "relpath": "topics/train.jsonl"}]).encode()
    altered = json.dumps([{"md5": "1" * 32, "relpath": "topics/train.jsonl"}]).encode()
    _refused(champion, _listing(champion, honest, stored=altered), ("was altered",), tmp_path)


def test_a_changed_label_set_is_retrained_when_the_settings_allow_it(champion, tmp_path):
    """'politics' becomes 'economy': validation lets it through, the candidate retrains the task with
    the new names, and the champion, which only knows the old set, is scored on names, not positions."""
    data = champion["project"] / "data"
    shutil.rmtree(data)
    shutil.copytree(champion["good"], data)
    (data / "topics" / "labels.json").write_text(json.dumps(["sports", "science", "economy"]))
    for split in ("train", "test"):
        rows = _lines(data / "topics" / f"{split}.jsonl")
        _write(data / "topics" / f"{split}.jsonl",
               [{**r, "label": "economy" if r["label"] == "politics" else r["label"]} for r in rows])
    version = snapshot(champion["project"])
    tracking_uri = champion["tracking_uri"]
    _, parent = _registry_state(tracking_uri)
    run_id, _ = lifecycle.claim(tracking_uri, version.hash, lifecycle.Policy())
    versions = steps.validate(tracking_uri, "moecl", parent, run_id, version.remote, version.hash,
                              {**RULES, "allow_label_change": True}, str(tmp_path / "dataset"))
    summary = steps.train(tracking_uri, "moecl", parent, run_id, champion["settings"], str(tmp_path / "dataset"),
                          versions, str(tmp_path / "model"))
    assert summary["changed_tasks"] == ["topics"] and summary["new_tasks"] == []
    manifest = read_manifest(tmp_path / "model")
    assert manifest["labels"]["topics"] == ["sports", "science", "economy"]
    evaluation = steps.evaluate(tracking_uri, "moecl", parent, run_id, champion["settings"], str(tmp_path / "dataset"),
                                str(tmp_path / "model"), summary, str(tmp_path / "evaluation.json"))
    # The champion can never say 'economy'; what it gets right on the other labels still counts.
    test = [e for e in per_label(load_task("topics", tmp_path / "dataset" / "topics").test, None, 0)]
    economy = [i for i, e in enumerate(test) if e.label == 2]
    assert economy and not any(evaluation["champion_correct"]["topics"][i] for i in economy)
    model, prompts, _ = load_model(champion["root"] / "run" / "checkpoint")
    said = predict(model, prompts["topics"], [e.text for e in test], 8)
    expected = [prompts["topics"].labels[p] == ["sports", "science", "economy"][e.label] for p, e in zip(said, test)]
    assert evaluation["champion_correct"]["topics"] == expected and any(expected)
