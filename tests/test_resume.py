"""A run killed with SIGKILL in the middle of a stage resumes from its last mid-stage checkpoint and
ends exactly like an uninterrupted run (data order, optimizer, loss scaler and dropout RNG restored)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from moecl.trainer import STEP_CHECKPOINT, Trainer

from .conftest import write_config
from .test_distributed import _adapters

LONG = {"train": {"epochs": 30, "batch_size": 2, "lr": 0.01, "max_length": 96, "seed": 3, "checkpoint_every": 5},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "memory": {"per_task": 4, "per_batch": 1}}


def test_a_run_killed_mid_stage_resumes_to_the_uninterrupted_result(tmp_path, task_dirs):
    tasks = {k: task_dirs[k] for k in ("topics", "sentiment")}
    cfg = write_config(tmp_path / "run.yaml", tasks, **LONG)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads (float summation order) for every run
    reference = subprocess.run([sys.executable, "-m", "moecl", "train", str(cfg), "--out", str(tmp_path / "whole")],
                               env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    command = [sys.executable, "-m", "moecl", "train", str(cfg), "--out", str(tmp_path / "killed")]
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "killed" / STEP_CHECKPOINT / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        try:
            if json.loads(manifest.read_text())["step_state"]["stage_index"] == 1:
                break  # the second stage is under way
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed mid-stage"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stopped_at = json.loads(manifest.read_text())["step_state"]["step"]
    assert not (tmp_path / "killed" / "metrics.json").exists() and 0 < stopped_at

    done = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming stage 2 after step {stopped_at}" in done.stderr
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["training"] == whole["training"]
    first, second = _adapters(tmp_path / "whole"), _adapters(tmp_path / "killed")
    assert first and first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not (tmp_path / "killed" / STEP_CHECKPOINT).exists()  # the finished stage superseded it


def test_a_retried_train_step_resumes_from_the_checkpoints_kept_in_the_run(tmp_path, monkeypatch):
    """What a KFP retry on a fresh pod does: nothing survives locally, the run's artifacts do."""
    from moecl.manifest import read_manifest
    from moecl.mlops import lifecycle, steps
    from moecl.mlops.versioning import init_project, materialize, snapshot, task_versions

    from .conftest import write_task

    project = init_project(tmp_path / "project", tmp_path / "remote")
    write_task(project / "data" / "topics", ["sports", "science", "politics"])
    write_task(project / "data" / "sentiment", ["bad", "good"], salt="review ")
    version = snapshot(project)
    dataset = materialize(version, tmp_path / "dataset")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {"backbone": "tiny-random-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
                "train": {"epochs": 3, "batch_size": 2, "lr": 0.01, "max_length": 96, "seed": 1, "checkpoint_every": 3}}
    versions = json.dumps(task_versions(version))

    def train(run_id, out):
        return steps.train(tracking_uri, "moecl", "", run_id, settings, str(dataset), versions, str(out))

    reference, _ = lifecycle.claim(tracking_uri, "0" * 32, lifecycle.Policy(), str(tmp_path / "artifacts"))
    train(reference, tmp_path / "reference")

    run_id, _ = lifecycle.claim(tracking_uri, version.hash, lifecycle.Policy())
    save = Trainer._save_within_stage

    def save_then_die(self, index, *args):
        save(self, index, *args)
        if index == 1:
            raise RuntimeError("node lost")  # mid-way through the second stage, after a mid-stage checkpoint
    monkeypatch.setattr(Trainer, "_save_within_stage", save_then_die)
    try:
        train(run_id, tmp_path / "first-attempt")
        raise AssertionError("the first attempt should have died")
    except RuntimeError as err:
        assert "node lost" in str(err)
    monkeypatch.undo()

    trained = []
    stage = Trainer.train_stage
    monkeypatch.setattr(Trainer, "train_stage", lambda self, s, past, index: trained.append(index) or stage(self, s, past, index))
    summary = train(run_id, tmp_path / "retry")
    assert trained == [1]  # the first stage came back from the run's artifacts, not from training
    assert summary["new_tasks"] == ["sentiment", "topics"]
    first, second = (_adapters(tmp_path / name, folder="") for name in ("reference", "retry"))  # the step's model folders
    assert first and first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert read_manifest(tmp_path / "retry")["progress"]["matrix"] == read_manifest(tmp_path / "reference")["progress"]["matrix"]


class _Crash(Exception):
    pass


class _Payload:
    """A pickled object that runs a command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_training_state_is_loaded_as_data_only_so_a_tampered_one_runs_nothing(tmp_path, task_dirs):
    """The pipeline brings training state back from a run's artifacts, which whoever can write the
    run's artifacts controls: a pickled object in it is refused, never executed."""
    import pickle

    import pytest

    from moecl.config import load_config
    from moecl.trainer import TRAINER_STATE

    cfg = load_config(write_config(tmp_path / "run.yaml", {"topics": task_dirs["topics"]}, **LONG))
    trainer = Trainer(cfg, tmp_path / "run")

    def crash_after_the_first_step_checkpoint(folder):
        if folder.name == STEP_CHECKPOINT:
            raise _Crash

    trainer.on_checkpoint = crash_after_the_first_step_checkpoint
    with pytest.raises(_Crash):
        trainer.run()
    marker = tmp_path / "ran"
    torch.save({"optimizer": _Payload(marker)}, tmp_path / "run" / STEP_CHECKPOINT / TRAINER_STATE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Trainer(cfg, tmp_path / "run").run(resume=True)
    assert not marker.exists()
