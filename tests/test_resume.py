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

from moecl.config import load_config
from moecl.trainer import STEP_CHECKPOINT, Trainer

from .conftest import write_config
from .test_distributed import _adapters

LONG = {"train": {"epochs": 30, "batch_size": 2, "lr": 0.01, "max_length": 96, "seed": 3, "checkpoint_every": 5},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "memory": {"per_task": 4, "per_batch": 1}}


def test_a_run_killed_mid_stage_resumes_to_the_uninterrupted_result(tmp_path, task_dirs):
    tasks = {k: task_dirs[k] for k in ("topics", "sentiment")}
    cfg = write_config(tmp_path / "run.yaml", tasks, **LONG)
    whole = Trainer(load_config(cfg), tmp_path / "whole").run()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    assert resumed["training"] == json.loads(json.dumps(whole["training"]))
    first, second = _adapters(tmp_path / "whole"), _adapters(tmp_path / "killed")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not (tmp_path / "killed" / STEP_CHECKPOINT).exists()  # the finished stage superseded it
