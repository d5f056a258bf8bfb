"""Checkpoints: adapter tensors in safetensors plus a JSON manifest, written after every task.

    DIR/checkpoint/manifest.json           backbone, method, config, tasks done, labels, data hashes, R so far
    DIR/checkpoint/adapters/<group>.safetensors   one file per expert (with its gates), 'router'
                                                  (discriminators), heads, 'task-router' (task-free routing)
    DIR/checkpoint-step/                   the same mid-stage (train.checkpoint_every), plus the optimizer,
                                           loss-scaler and RNG state, so a killed run resumes within its stage

A new checkpoint is written beside the old one and swapped in by renames, so an interruption
never leaves a half-written checkpoint and never loses the previous one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .manifest import CHECKPOINT, FORMAT_VERSION, read_manifest
from .model import ContinualModel

def save_checkpoint(model: ContinualModel, run_dir: Path, manifest: dict, name: str = CHECKPOINT,
                    extra: dict[str, object] | None = None, texts: dict[str, str] | None = None) -> Path:
    """Write DIR/<name> atomically; `extra`: more objects saved with torch.save (e.g. optimizer state),
    `texts`: more text files (e.g. the answers scored for this checkpoint, moecl.answer_keys)."""
    run_dir = Path(run_dir)
    final, staging, retired = (run_dir / f"{name}{s}" for s in ("", ".new", ".old"))
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "adapters").mkdir(parents=True)
    for file, obj in (extra or {}).items():
        torch.save(obj, staging / file)
    for file, text in (texts or {}).items():
        (staging / file).write_text(text)
    for group, tensors in model.adapter_groups().items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, staging / "adapters" / f"{group}.safetensors")
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(retired, ignore_errors=True)
    if final.exists():
        final.rename(retired)
    staging.rename(final)
    shutil.rmtree(retired, ignore_errors=True)
    return final


def load_adapters(model: ContinualModel, manifest: dict) -> None:
    """Fill `model` (already holding the manifest's tasks) with the checkpoint's adapter tensors."""
    folder = Path(manifest["path"]) / "adapters"
    groups = {f.stem: load_file(f, device=str(model.device)) for f in sorted(folder.glob("*.safetensors"))}
    model.load_adapter_groups(groups)


def load_model(path: str | Path):
    """(model, prompts per task, manifest) of a checkpoint, ready to predict, in the run's precision,
    on CUDA when present (wherever the run was trained)."""
    from .backbone import load_backbone
    from .config import LoraConfig
    from .prompts import TaskPrompt

    manifest = read_manifest(Path(path))
    train = manifest["config"]["train"]
    precision = train.get("precision", "fp32")
    backbone, tokenizer = load_backbone(manifest["backbone"], "auto", precision)
    model = ContinualModel(backbone, tokenizer, manifest["method"], LoraConfig(**manifest["config"]["lora"]),
                           manifest["head"], precision)
    for task in manifest["tasks"]:
        model.add_task(task, manifest["labels"][task])
    load_adapters(model, manifest)
    model.eval()
    prompts = {task: TaskPrompt(tokenizer, task, manifest["labels"][task], manifest["max_length"],
                                manifest["instructions"][task]) for task in manifest["tasks"]}
    return model, prompts, manifest
