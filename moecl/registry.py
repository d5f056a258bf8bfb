"""The MLflow side: runs per data version, the registered model, its `champion` alias and rollback.

A registered version is a pyfunc holding only the adapter checkpoint (the backbone is loaded by
name), answering {task, text} -> label. Aliases, not stages: `champion` is what serves,
`previous-champion` what it replaced.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHAMPION = "champion"
PREVIOUS = "previous-champion"
EXPERIMENT = "moecl"
TAG_DATA_VERSION = "moecl.data_version"
TAG_OUTCOME = "moecl.outcome"  # validation_failed | promoted | rejected: the version was processed
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5,<6", "safetensors", "pyyaml", "tqdm", "gguf", "pandas"]


def connect(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


def experiment_id(tracking_uri: str, artifact_root: str | None = None) -> str:
    """The project's experiment, created on first use (with a local artifact root if given)."""
    client = connect(tracking_uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def git_commit() -> str:
    """The code version: set in images at build time, else read from the checkout."""
    if os.environ.get("MOECL_GIT_COMMIT"):
        return os.environ["MOECL_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class Champion:
    version: str
    checkpoint: Path
    tags: dict[str, str]

    @property
    def task_versions(self) -> dict[str, str]:
        return json.loads(self.tags.get("task_versions", "{}"))


def alias_version(tracking_uri: str, model_name: str, alias: str) -> str | None:
    try:
        return str(connect(tracking_uri).get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def download_checkpoint(tracking_uri: str, model_name: str, version: str, dest: str | Path) -> Path:
    connect(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=str(dest)))
    manifests = sorted((local / "artifacts").rglob("manifest.json"))  # the pyfunc stores it under its folder name
    if not manifests:
        raise FileNotFoundError(f"model {model_name} version {version} holds no moecl checkpoint")
    return manifests[0].parent


def fetch(tracking_uri: str, model_name: str, version: str | None, dest: str | Path) -> Champion | None:
    """A registered version with its checkpoint downloaded under `dest`; None for no version."""
    if not version:
        return None
    tags = connect(tracking_uri).get_model_version(model_name, version).tags
    return Champion(version, download_checkpoint(tracking_uri, model_name, version, dest), dict(tags))


class MoeclPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a checkpoint: input rows {text, task (optional)}, output one label per row. Rows
    without a task are routed to one by the model's task-free router."""

    def load_context(self, context) -> None:
        from .checkpoint import load_model

        self.model, self.prompts, _ = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        from .scoring import answer

        tasks = model_input["task"].tolist() if "task" in model_input else [None] * len(model_input)
        tasks = [t if isinstance(t, str) and t else None for t in tasks]  # NaN / None / "" -> route
        return [label for _, label in answer(self.model, self.prompts, model_input["text"].tolist(), tasks)]


def register(tracking_uri: str, model_name: str, run_id: str, checkpoint: str | Path, tags: dict[str, str]) -> str:
    """Log the checkpoint as a pyfunc in the run, register it, tag the version; return the version."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    client = connect(tracking_uri)
    signature = ModelSignature(inputs=Schema([ColSpec("string", "task", required=False), ColSpec("string", "text")]),
                               outputs=Schema([ColSpec("string")]))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=MoeclPyfunc(), artifacts={"checkpoint": str(checkpoint)},
                                       signature=signature, pip_requirements=PIP_REQUIREMENTS)
    version = mlflow.register_model(info.model_uri, model_name).version
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return str(version)


def promote(tracking_uri: str, model_name: str, version: str) -> str | None:
    """Move `champion` to `version`; `previous-champion` keeps the one it replaced (returned)."""
    client = connect(tracking_uri)
    old = alias_version(tracking_uri, model_name, CHAMPION)
    if old is not None and old != version:
        client.set_registered_model_alias(model_name, PREVIOUS, old)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    return old


def rollback(tracking_uri: str, model_name: str) -> tuple[str, str]:
    """Give `champion` back to `previous-champion`; returns (demoted, restored). The demoted version
    is tagged, and `previous-champion` is cleared so a second rollback cannot bring it back."""
    client = connect(tracking_uri)
    restored = alias_version(tracking_uri, model_name, PREVIOUS)
    demoted = alias_version(tracking_uri, model_name, CHAMPION)
    if restored is None or demoted is None:
        raise ValueError(f"model '{model_name}' has no '{PREVIOUS}' alias to roll back to")
    client.set_registered_model_alias(model_name, CHAMPION, restored)
    client.delete_registered_model_alias(model_name, PREVIOUS)
    client.set_model_version_tag(model_name, demoted, "moecl.rolled_back", "true")
    return demoted, restored


def processed_versions(tracking_uri: str) -> set[str]:
    """Data versions whose pipeline run reached an outcome (a crashed run is retried)."""
    connect(tracking_uri)
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=f"tags.`{TAG_OUTCOME}` != ''",
                              output_format="list")
    return {run.data.tags[TAG_DATA_VERSION] for run in runs if TAG_DATA_VERSION in run.data.tags}
