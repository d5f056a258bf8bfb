"""Data versions: the repository's data.dvc names the shipped sample, and versions are fetched exactly."""
from __future__ import annotations

import shutil
from pathlib import Path

import json

import pytest

from moecl.mlops.versioning import current_version, init_project, materialize, snapshot, task_versions
from tests.stores import s3_endpoint  # noqa: F401  (fixture)

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


@pytest.fixture
def aws_credentials_only(monkeypatch):
    """What a step gets on the cluster: the keys (a Secret), no endpoint: that is the remote's config."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_steps_reach_an_s3_remote_through_its_own_dvc_config(tmp_path, s3_endpoint, aws_credentials_only):
    project = init_project(tmp_path / "project", "s3://data/dvc")
    with (project / ".dvc" / "config").open("a") as config:  # as `dvc remote modify storage endpointurl ...`
        config.write(f"    endpointurl = {s3_endpoint}\n")
    (project / ".dvc" / "config.local").write_text(  # credentials stay local: never part of the version
        "['remote \"storage\"']\n    access_key_id = testing\n    secret_access_key = testing\n")
    shutil.copytree(ROOT / "samples" / "mtl5" / "agnews", project / "data" / "agnews")
    version = snapshot(project)

    assert json.loads(version.remote) == {"url": "s3://data/dvc", "endpointurl": s3_endpoint}
    assert version.remote_url == "s3://data/dvc"
    shutil.rmtree(project)  # a step has the version alone: no project, no DVC config, no endpoint variable
    assert set(task_versions(version)) == {"agnews"}
    fetched = materialize(version, tmp_path / "fetched")
    assert (fetched / "agnews" / "train.jsonl").read_bytes() == (ROOT / "samples/mtl5/agnews/train.jsonl").read_bytes()
