"""Shared fixtures: small task folders and a tiny random Llama built from a config."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from moecl.backbone import TINY_LLAMA, load_backbone
from moecl.config import LoraConfig
from moecl.model import ContinualModel

# tests/containers runs the project's image: scripts/test-containers.sh builds it and names it.
collect_ignore = [] if os.environ.get("MOECL_IMAGE") else ["containers"]

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def write_task(folder: Path, labels: list[str], per_label: tuple[int, int] = (6, 3), salt: str = "") -> Path:
    """A task folder in the MTL5 format whose texts repeat their label, so even a tiny random model can learn it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    for split, count in zip(("train", "test"), per_label):
        rows = [
            {"text": f"{salt}{split} {i} {WORDS[(i + j) % len(WORDS)]}: {' '.join([label] * 6)}", "label": label}
            for j, label in enumerate(labels) for i in range(count)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def task_dirs(tmp_path) -> dict[str, Path]:
    return {
        "topics": write_task(tmp_path / "data" / "topics", ["sports", "science", "politics"]),
        "sentiment": write_task(tmp_path / "data" / "sentiment", ["bad", "good"], salt="review "),
        "animals": write_task(tmp_path / "data" / "animals", ["cat", "dog", "bird", "fish"], salt="pet "),
    }


def write_config(path: Path, task_dirs: dict[str, Path], **overrides) -> Path:
    raw = {
        "backbone": TINY_LLAMA,
        "method": "moecl",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "adversarial": {"weight": 0.1},
        # fp32 pinned: these tests assert exact equalities, and `auto` would resolve to bf16 on some CI CPUs
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "max_length": 96, "seed": 3, "precision": "fp32"},
        "eval": {"batch_size": 4},
        "tasks": [{"name": name, "data": str(folder)} for name, folder in task_dirs.items()],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tiny_model():
    """A fresh tiny-Llama ContinualModel per call: make(method, **lora overrides)."""
    def make(method: str = "moecl", head: str = "lm", **lora) -> ContinualModel:
        backbone, tokenizer = load_backbone(TINY_LLAMA)
        return ContinualModel(backbone, tokenizer, method, LoraConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **lora}), head)
    return make
