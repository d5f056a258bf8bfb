"""Data-parallel training: processes and micro-batches change how a batch is computed, never the result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecl.config import load_config
from moecl.distributed import torchrun
from moecl.manifest import read_manifest
from moecl.trainer import ResumeError, Trainer

from .conftest import write_config

# 18 topic rows in batches of 17 end with a one-row batch: with 2 processes one of them has no row of it.
ODD_BATCHES = {"train": {"batch_size": 17, "epochs": 2, "lr": 0.01, "max_length": 96, "seed": 3}}


def _adapters(run: Path, folder: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every adapter tensor of a run folder's checkpoint (or, with folder="", of a checkpoint folder)."""
    folder = run / folder / "adapters"
    return {f"{f.stem}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_same_adapters(a: Path, b: Path) -> None:
    first, second = _adapters(a), _adapters(b)
    assert first.keys() == second.keys()
    for key in first:
        # Float sums in another order differ in the last bits; Adam's normalised steps can carry
        # that to ~1e-5 in a weight whose gradient is near zero.
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-4, msg=key)


def _train(cfg: Path, out: Path, processes: int, log: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run([*launcher, "-m", "moecl", "train", str(cfg), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if log:
        log.write_text(done.stdout + done.stderr)
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_train_what_one_process_trains(tmp_path, task_dirs):
    tasks = {k: task_dirs[k] for k in ("topics", "sentiment")}
    single = write_config(tmp_path / "one.yaml", tasks, **ODD_BATCHES, memory={"per_task": 6, "per_batch": 3})
    # The same run in 2 processes, each passing its share of a batch in micro-batches of 3 rows.
    double = write_config(tmp_path / "two.yaml", tasks, **ODD_BATCHES, memory={"per_task": 6, "per_batch": 3})
    raw = double.read_text().replace("batch_size: 17", "batch_size: 17\n  micro_batch_size: 3")
    double.write_text(raw)
    one = _train(single, tmp_path / "one", 1)
    two = _train(double, tmp_path / "two", 2)

    assert (tmp_path / "two" / "checkpoint" / "manifest.json").is_file()
    assert not list((tmp_path / "two").glob("checkpoint.*")), "a staging or retired checkpoint was left behind"
    tests = {"topics": 9, "sentiment": 6}
    for row_one, row_two in zip(one["accuracy_matrix"], two["accuracy_matrix"]):
        for task, a, b in zip(tests, row_one, row_two):
            assert abs(a - b) <= 1 / tests[task] + 1e-9, (task, a, b)
    _assert_same_adapters(tmp_path / "one", tmp_path / "two")
    # The discriminator statistics were summed over both processes, not taken from one of them.
    assert abs(one["training"][1]["disc_acc"] - two["training"][1]["disc_acc"]) < 1e-3


def test_micro_batches_accumulate_to_the_full_batch(tmp_path, task_dirs):
    tasks = {k: task_dirs[k] for k in ("topics", "sentiment")}
    memory = {"per_task": 6, "per_batch": 3}
    whole = write_config(tmp_path / "whole.yaml", tasks, memory=memory, retention={"distill": 0.5})
    micro = write_config(tmp_path / "micro.yaml", tasks, memory=memory, retention={"distill": 0.5},
                         train={"micro_batch_size": 1})
    Trainer(load_config(whole), tmp_path / "whole").run()
    Trainer(load_config(micro), tmp_path / "micro").run()
    _assert_same_adapters(tmp_path / "whole", tmp_path / "micro")


def test_continuing_a_model_in_two_processes_matches_one(tmp_path, task_dirs, monkeypatch):
    """What the pipeline's train step does on a node with several GPUs: torchrun `moecl train --from`."""
    first = write_config(tmp_path / "first.yaml", {"topics": task_dirs["topics"]}, **ODD_BATCHES)
    Trainer(load_config(first), tmp_path / "champion").run()
    both = load_config(write_config(tmp_path / "both.yaml", {k: task_dirs[k] for k in ("topics", "sentiment")},
                                    **ODD_BATCHES))
    start = tmp_path / "champion" / "checkpoint"
    one = Trainer(both, tmp_path / "one").extend(read_manifest(start))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    two = torchrun(both.to_dict(), tmp_path / "two", 2, start)
    assert [s["stage"] for s in two["training"]] == ["topics", "sentiment"]  # only sentiment was trained here
    assert one["accuracy_matrix"][-1] == pytest.approx(two["accuracy_matrix"][-1], abs=1 / 6 + 1e-9)
    _assert_same_adapters(tmp_path / "one", tmp_path / "two")


def test_a_model_continued_with_a_config_missing_its_tasks_is_refused(tmp_path, task_dirs):
    first = write_config(tmp_path / "first.yaml", {"topics": task_dirs["topics"]})
    Trainer(load_config(first), tmp_path / "champion").run()
    other = write_config(tmp_path / "other.yaml", {"sentiment": task_dirs["sentiment"]})
    with pytest.raises(ResumeError, match="topics"):
        Trainer(load_config(other), tmp_path / "next").extend(read_manifest(tmp_path / "champion"))


def test_two_processes_sharding_the_backbone_train_what_one_process_trains(tmp_path, task_dirs):
    """train.parallel fsdp: the decoder layers' base weights are split over the processes, the
    adapters replicated; uneven last batches and shares of a test set still give one process's run."""
    tasks = {k: task_dirs[k] for k in ("topics", "sentiment")}
    settings = {**ODD_BATCHES, "memory": {"per_task": 6, "per_batch": 3}}
    one = _train(write_config(tmp_path / "one.yaml", tasks, **settings), tmp_path / "one", 1)
    sharded = write_config(tmp_path / "fsdp.yaml", tasks, **{**settings, "train": {
        **ODD_BATCHES["train"], "micro_batch_size": 3, "parallel": "fsdp"}})
    two = _train(sharded, tmp_path / "fsdp", 2, log=tmp_path / "fsdp.log")
    assert "decoder layers sharded over 2 processes" in (tmp_path / "fsdp.log").read_text()
    tests = {"topics": 9, "sentiment": 6}
    for row_one, row_two in zip(one["accuracy_matrix"], two["accuracy_matrix"]):
        for task, a, b in zip(tests, row_one, row_two):
            assert abs(a - b) <= 1 / tests[task] + 1e-9, (task, a, b)
    _assert_same_adapters(tmp_path / "one", tmp_path / "fsdp")
