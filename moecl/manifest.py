"""A checkpoint's manifest (see moecl.checkpoint): what the checkpoint holds, read without torch,
so the pipeline steps that only plan, validate or register a model start quickly."""
from __future__ import annotations

import json
from pathlib import Path

FORMAT_VERSION = 2  # 2: text-first prompts, per-task gates, task-router statistics
CHECKPOINT = "checkpoint"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def read_manifest(path: Path) -> dict:
    """Manifest of a checkpoint folder, or of a run folder holding one."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        path = checkpoint_dir(path)
    file = path / "manifest.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no checkpoint manifest (was the run finished or resumed?)")
    manifest = json.loads(file.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: checkpoint format {manifest.get('format_version')} is not {FORMAT_VERSION}")
    manifest["path"] = str(path)
    return manifest
