"""Scheduled retraining with real processes of the real command on a real sqlite store, for runs as
long as real ones: a trigger while a run's steps work launches nothing, a step that always fails is
launched exactly --max-attempts times, two overlapping data versions both reach the champion's
lineage, and a refused version says why on the trigger's own console."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

from moecl.mlops import registry
from moecl.mlops.trigger import trigger
from moecl.mlops.versioning import current_version, init_project, snapshot

from .conftest import write_task
from .test_pipeline import LENIENT_GATE, RULES, TINY_TRAINING

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path) -> Path:
    root = init_project(tmp_path / "project", tmp_path / "dvc-remote")
    write_task(root / "data" / "topics", ["sports", "science", "politics"])
    snapshot(root)
    return root


def _settings(tmp_path, **training) -> Path:
    path = tmp_path / "settings.yaml"
    train = {**TINY_TRAINING["train"], "epochs": 1, **training.pop("train", {})}
    path.write_text(yaml.safe_dump({"model_name": "moecl", "training": {**TINY_TRAINING, **training, "train": train},
                                    "validation": RULES, "gate": LENIENT_GATE}))
    return path


def _trigger(tmp_path, project, settings, *extra, wait=True):
    command = [sys.executable, "-m", "pipelines", "trigger", "--project", str(project), "--workdir",
               str(tmp_path / "work"), "--settings", str(settings), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tracking(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"


def _runs(tracking_uri) -> list:
    registry.init_store(tracking_uri)  # never while a trigger creates the schema: under its lock
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(registry.EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _wait_for_metric(tracking_uri, metric, process, timeout=600):
    """The run's id once one of its runs has logged `metric` (a step's `seconds.<step>`: it ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        for run in _runs(tracking_uri) if Path(tracking_uri.removeprefix("sqlite:///")).is_file() else []:
            if metric in run.data.metrics:
                return run.info.run_id
        time.sleep(0.2)
    raise AssertionError(f"no run logged {metric} within {timeout}s")


def _never(version, run_id):
    raise AssertionError(f"a second run was launched for {version.short}: {run_id}")


def test_a_trigger_while_the_run_trains_or_evaluates_launches_nothing(tmp_path):
    project = _project(tmp_path)
    settings = _settings(tmp_path, train={"epochs": 12})  # a train step long enough to trigger during it
    tracking_uri = _tracking(tmp_path)
    first = _trigger(tmp_path, project, settings, wait=False)
    run_id = _wait_for_metric(tracking_uri, "seconds.validate", first)
    assert trigger(project, tracking_uri, _never) is None  # validate has ended: train is working
    during_train = MlflowClient(tracking_uri).get_run(run_id)
    assert during_train.info.status == "RUNNING" and "seconds.train" not in during_train.data.metrics
    _wait_for_metric(tracking_uri, "seconds.train", first)
    assert trigger(project, tracking_uri, _never) is None  # train has ended: evaluate is starting
    during_evaluate = MlflowClient(tracking_uri).get_run(run_id)
    assert during_evaluate.info.status == "RUNNING" and "seconds.evaluate" not in during_evaluate.data.metrics
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    [run] = _runs(tracking_uri)
    assert run.data.tags[registry.TAG_OUTCOME] == "promoted" and run.info.status == "FINISHED"


def test_a_step_that_always_fails_is_launched_max_attempts_times_then_shown_failed(tmp_path):
    project = _project(tmp_path)
    (tmp_path / "broken-backbone").mkdir()  # passes the settings check, fails in the train step
    settings = _settings(tmp_path, backbone=str(tmp_path / "broken-backbone"))
    policy = ("--max-attempts", "2", "--backoff-seconds", "0")
    for attempt in (1, 2):
        failed = _trigger(tmp_path, project, settings, *policy)
        console = re.sub(r"\x1b\[[0-9;]*m", "", failed.stdout + failed.stderr)  # kfp colours its lines
        assert failed.returncode == 1 and "Inner task failed: 'train'" in console, console[-3000:]
        log = (tmp_path / "work" / "logs" / f"{_runs(_tracking(tmp_path))[0].info.run_id}.log").read_text()
        assert "broken-backbone" in log, log[-3000:]
        assert len(_runs(_tracking(tmp_path))) == attempt
    again = _trigger(tmp_path, project, settings, *policy)
    assert again.returncode == 0 and "nothing to launch" in again.stdout, again.stderr[-2000:]
    assert len(_runs(_tracking(tmp_path))) == 2
    runs = _runs(_tracking(tmp_path))
    assert all(r.info.status == "FAILED" for r in runs) and {r.data.tags[registry.TAG_OUTCOME] for r in runs} == {"failed"}
    status = subprocess.run([sys.executable, "-m", "pipelines", "status", "--workdir", str(tmp_path / "work"), *policy],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    [line] = [line for line in status.stdout.splitlines() if line.startswith(current_version(project).hash[:12])]
    assert line.split()[1:3] == ["failed", "2"], status.stdout


def test_two_overlapping_data_versions_both_reach_the_champion(tmp_path):
    project = _project(tmp_path)
    settings = _settings(tmp_path, train={"epochs": 4})
    tracking_uri = _tracking(tmp_path)
    first = _trigger(tmp_path, project, settings, wait=False)
    _wait_for_metric(tracking_uri, "seconds.validate", first)  # D1 is fetched and training
    write_task(project / "data" / "animals", ["cat", "dog", "bird", "fish"], salt="pet ")
    newer = snapshot(project)
    second = _trigger(tmp_path, project, settings, wait=False)  # D2, from the same (no) champion
    for process in (first, second):
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
    for _ in range(3):  # the next ticks: a stale D2 is trained again from the new champion
        if "nothing to launch" in _trigger(tmp_path, project, settings, "--backoff-seconds", "0").stdout:
            break
    champion = registry.alias_version(tracking_uri, "moecl", registry.CHAMPION)
    version = MlflowClient(tracking_uri).get_model_version("moecl", champion)
    assert version.tags["data_version"] == newer.hash  # the later data is in the champion
    assert set(json.loads(version.tags["task_versions"])) == {"topics", "animals"}
    outcomes = sorted(r.data.tags[registry.TAG_OUTCOME] for r in _runs(tracking_uri))
    assert outcomes in (["promoted", "promoted", "stale"], ["promoted", "superseded"]), outcomes


def test_a_refused_version_names_file_row_and_rule_on_the_console_without_a_traceback(tmp_path):
    project = _project(tmp_path)
    bad = project / "data" / "topics" / "train.jsonl"
    bad.write_text(bad.read_text() + "{not json\n" + json.dumps({"text": "x", "label": "weather"}) + "\n")
    snapshot(project)
    refused = _trigger(tmp_path, project, _settings(tmp_path))
    console = refused.stdout + refused.stderr
    assert refused.returncode == 3, console[-3000:]
    assert "Traceback" not in console, console[-3000:]
    rows = len(bad.read_text().splitlines())
    assert f"topics/train.jsonl: row {rows - 1}: rule valid_json" in refused.stderr, refused.stderr
    assert "refused by validation" in refused.stderr and len(refused.stderr.splitlines()) < 15
    again = _trigger(tmp_path, project, _settings(tmp_path))
    assert again.returncode == 0 and "nothing to launch" in again.stdout  # refusal is final for this version
