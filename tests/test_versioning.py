"""Data versions: the repository's data.dvc names the shipped sample, and versions are fetched exactly."""
from __future__ import annotations

import shutil
from pathlib import Path

from moecl.mlops.versioning import current_version, init_project, materialize, snapshot, task_versions

ROOT = Path(__file__).resolve().parents[1]


def test_repository_data_dvc_is_the_shipped_sample(tmp_path):
    project = init_project(tmp_path / "project", tmp_path / "remote")
    for task in ("dbpedia", "agnews"):
        shutil.copytree(ROOT / "samples" / "mtl5" / task, project / "data" / task)
    assert snapshot(project).hash == current_version(ROOT).hash
    assert current_version(ROOT).remote == str(ROOT / "work" / "dvc-remote")


def test_a_changed_task_changes_only_its_own_version(tmp_path):
    project = init_project(tmp_path / "project", tmp_path / "remote")
    for task in ("dbpedia", "agnews"):
        shutil.copytree(ROOT / "samples" / "mtl5" / task, project / "data" / task)
    first = snapshot(project)
    with (project / "data" / "agnews" / "train.jsonl").open("a") as handle:
        handle.write('{"text": "Title: new\\nText: one more", "label": "World"}\n')
    second = snapshot(project)
    before, after = task_versions(first), task_versions(second)
    assert first.hash != second.hash
    assert before["dbpedia"] == after["dbpedia"] and before["agnews"] != after["agnews"]
    fetched = materialize(first, tmp_path / "fetched")  # the old version, byte for byte
    assert (fetched / "agnews" / "train.jsonl").read_bytes() == (ROOT / "samples/mtl5/agnews/train.jsonl").read_bytes()
