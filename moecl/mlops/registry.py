"""The MLflow side: runs per data version, the registered model, its `champion` alias and rollback.

A registered version is a pyfunc holding only the adapter checkpoint (the backbone is loaded by
name), answering {task, text} -> label. Aliases, not stages: `champion` is what serves,
`previous-champion` what it replaced.
"""
from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import socket
import subprocess
import time
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
TAG_OUTCOME = "moecl.outcome"  # see moecl.mlops.lifecycle for the outcomes
TAG_DATA_SEQ = "moecl.data_seq"  # a run's data version's place in the data lineage (its first claim ticket)
TAG_NEWEST_DATA = "moecl.newest_data_seq"  # on the registered model: the newest data a champion ever held
# moecl itself ships with the model (code_paths), so the model loads in an environment built from these alone.
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.24,<6", "safetensors", "pyyaml", "tqdm", "gguf", "pandas", "matplotlib"]
# A tracking server that is down fails a call after a bounded wait (4 retries, backoff 1, 2, 4, 8 s)
# rather than MLflow's default 7 retries with factor 2 (about 4 minutes); a deployment may set its own.
for _name, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                      ("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")):
    os.environ.setdefault(_name, _value)
MAX_TEXT_CHARS = 20000  # a served text longer than this is refused (the validation step's default bound)
UNKNOWN_TASK = "unknown task"  # the served answer for a row the router finds of no known task


def init_store(tracking_uri: str) -> None:
    """Create the tracking store's schema once. Processes creating one fresh sqlite store at the same
    time race inside MLflow's migrations; a lock file next to the database serialises them."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def connect(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


class RunClosed(RuntimeError):
    """The pipeline run was closed (its lease ran out, an operator failed it) while a step worked."""


@contextlib.contextmanager
def logging_to(tracking_uri: str, run_id: str):
    """Make `run_id` MLflow's active run for the block (fluent logging: params, inputs, models)
    without ending it. Leaving `mlflow.start_run` marks a run FINISHED, and a pipeline run that reads
    as finished while its later steps still work is taken for dead by the next trigger: the run is
    only ever closed by the pipeline's exit handler (or by its lease running out). MLflow has no
    public way to leave a run unended, so the block takes it off the fluent API's stack itself."""
    from mlflow.environment_variables import MLFLOW_RUN_ID
    from mlflow.tracking import fluent

    status = connect(tracking_uri).get_run(run_id).info.status
    if status != "RUNNING":  # start_run would reopen it: a step of a run already closed must not revive it
        raise RunClosed(f"MLflow run {run_id} is already {status}: this step's work is not recorded")
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    finally:
        stack = fluent._active_run_stack.get()
        if stack and stack[-1].info.run_id == run_id:
            stack.pop()
        MLFLOW_RUN_ID.unset()


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


class RowError(MlflowException):
    """A bad request row, answered as HTTP 400 with just this one line. The scoring server rewrites
    an error's message to 'Failed to predict data <the whole batch>...', echoing the client's texts
    into the response (and into logs); this message is set once and kept."""

    @property
    def message(self) -> str:
        return self._row_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_row_message"):
            self._row_message = value


class MoeclPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a checkpoint: input rows {text, task (optional)}, output one label per row. Rows
    without a task are routed to one by the model's task-free router; a row it finds of no known
    task is answered UNKNOWN_TASK, not with a guess from some task's labels."""

    def load_context(self, context) -> None:
        from ..checkpoint import load_model

        self.model, self.prompts, _ = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        from ..scoring import answer

        tasks = model_input["task"].tolist() if "task" in model_input else [None] * len(model_input)
        tasks = [t if isinstance(t, str) and t else None for t in tasks]  # NaN / None / "" -> route
        texts = model_input["text"].tolist()
        self._check(texts, tasks)
        return [UNKNOWN_TASK if label is None else label for _, label in answer(self.model, self.prompts, texts, tasks)]

    def _check(self, texts: list, tasks: list) -> None:
        """A bad row is the client's error: one line naming the row, answered as HTTP 400 when served."""
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        for row, (text, task) in enumerate(zip(texts, tasks)):
            problem = None
            if task is not None and task not in self.prompts:
                problem = f"unknown task '{task}' (this model knows {', '.join(self.prompts)})"
            elif not isinstance(text, str) or not text.strip():
                problem = "text is empty"
            elif len(text) > MAX_TEXT_CHARS:
                problem = f"text has {len(text)} characters, more than {MAX_TEXT_CHARS}"
            if problem:
                raise RowError(f"row {row}: {problem}", error_code=INVALID_PARAMETER_VALUE)


def register(tracking_uri: str, model_name: str, run_id: str, checkpoint: str | Path, tags: dict[str, str]) -> str:
    """Log the checkpoint as a pyfunc in the run, register it, tag the version; return the version.
    Keyed on the run: a retried step finds the version its earlier attempt registered."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    client = connect(tracking_uri)
    existing = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    if existing:
        version = str(min(int(v.version) for v in existing))
    else:
        signature = ModelSignature(inputs=Schema([ColSpec("string", "task", required=False), ColSpec("string", "text")]),
                                   outputs=Schema([ColSpec("string")]))
        with logging_to(tracking_uri, run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=MoeclPyfunc(), artifacts={"checkpoint": str(checkpoint)},
                                           signature=signature, pip_requirements=PIP_REQUIREMENTS,
                                           code_paths=[str(Path(__file__).parents[1])])
        version = str(mlflow.register_model(info.model_uri, model_name).version)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return version


class StaleChampion(RuntimeError):
    """The champion moved since the candidate's run started: promoting it would undo that move."""


class Superseded(RuntimeError):
    """The candidate learned from data older than data a champion already held."""


def actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


@contextlib.contextmanager
def alias_lock(tracking_uri: str, model_name: str, wait_seconds: float = 120.0, stale_seconds: float = 600.0):
    """Exclusive right to move the model's aliases. Each contender takes a ticket (moecl.mlops.tickets);
    the holder is the lowest ticket not released, so there is one holder at a time whoever the
    contenders are, and each releases only its own. A ticket older than `stale_seconds` on the
    store's clock (its holder died holding it) is passed over."""
    from .tickets import TicketRoll

    roll = TicketRoll(tracking_uri)
    mine = roll.take("alias-lock", model_name, holder=actor())
    taken = time.monotonic()
    try:
        while True:
            store_now_ms = mine.created_ms + 1000 * (time.monotonic() - taken)
            ahead = [t for t in roll.tickets("alias-lock", model_name)
                     if t.number < mine.number and store_now_ms - t.created_ms <= 1000 * stale_seconds]
            if not ahead:
                break
            if time.monotonic() - taken > wait_seconds:
                raise TimeoutError(f"the aliases of '{model_name}' are locked by {ahead[0].tags.get('holder')}")
            time.sleep(0.5)
        yield
    finally:
        roll.release(mine)


def _record_move(client: MlflowClient, model_name: str, alias: str, version: str, who: str, why: str) -> None:
    """Every alias move is kept on the registered model (`moecl.alias_log`, the last 20) and on the version."""
    model = client.get_registered_model(model_name)
    history = json.loads(model.tags.get("moecl.alias_log", "[]"))
    history.append({"alias": alias, "version": version, "by": who, "why": why[:300], "at": round(time.time())})
    client.set_registered_model_tag(model_name, "moecl.alias_log", json.dumps(history[-20:]))
    client.set_model_version_tag(model_name, version, f"moecl.{alias}_by", who)
    client.set_model_version_tag(model_name, version, f"moecl.{alias}_why", why[:500])


def promote(tracking_uri: str, model_name: str, version: str, expected: str | None, who: str, why: str,
            data_seq: int | None = None) -> str | None:
    """Move `champion` to `version` if it is still `expected` (the champion the candidate was trained
    from; None: there was none) and the candidate's data (`data_seq`, its place in the data lineage)
    is not older than data a champion already held, as one compare-and-set under the alias lock;
    `previous-champion` keeps the one replaced (returned). Raises Superseded or StaleChampion otherwise.
    A rollback does not lower the newest data held, so an old run cannot slip in after one."""
    client = connect(tracking_uri)
    with alias_lock(tracking_uri, model_name):
        newest = (client.get_registered_model(model_name).tags or {}).get(TAG_NEWEST_DATA)
        if data_seq is not None and newest is not None and data_seq < int(newest):
            raise Superseded(f"version {version} learned data #{data_seq}; a champion already held newer "
                             f"data (#{newest})")
        old = alias_version(tracking_uri, model_name, CHAMPION)
        if old != expected:
            raise StaleChampion(f"champion is version {old}, not version {expected} as when this candidate was "
                                f"trained: version {version} would undo that")
        if old is not None and old != version:
            client.set_registered_model_alias(model_name, PREVIOUS, old)
        client.set_registered_model_alias(model_name, CHAMPION, version)
        if data_seq is not None:
            client.set_registered_model_tag(model_name, TAG_NEWEST_DATA, str(max(data_seq, int(newest or 0))))
        _record_move(client, model_name, CHAMPION, version, who, why)
    return old


def rollback(tracking_uri: str, model_name: str, to: str | None = None, reason: str = "") -> tuple[str, str]:
    """Give `champion` back to `previous-champion`, or to version `to`; returns (demoted, restored).
    The demoted version is tagged, and `previous-champion` is cleared so a second rollback cannot
    bring it back. Who did it and why is recorded with the move."""
    client = connect(tracking_uri)
    with alias_lock(tracking_uri, model_name):
        demoted = alias_version(tracking_uri, model_name, CHAMPION)
        restored = to or alias_version(tracking_uri, model_name, PREVIOUS)
        if restored is None or demoted is None:
            raise ValueError(f"model '{model_name}' has no '{PREVIOUS}' alias to roll back to; pass --to VERSION")
        try:
            client.get_model_version(model_name, restored)
        except MlflowException:
            raise ValueError(f"model '{model_name}' has no version {restored}") from None
        client.set_registered_model_alias(model_name, CHAMPION, restored)
        if alias_version(tracking_uri, model_name, PREVIOUS) is not None:
            client.delete_registered_model_alias(model_name, PREVIOUS)
        client.set_model_version_tag(model_name, demoted, "moecl.rolled_back", "true")
        _record_move(client, model_name, CHAMPION, restored, actor(), f"rollback from version {demoted}: {reason}")
    return demoted, restored


def last_decision(tracking_uri: str, model_name: str) -> dict | None:
    """The gate's decision on the newest version it judged: version, promoted/rejected, reasons."""
    client = connect(tracking_uri)
    judged = [v for v in client.search_model_versions(f"name='{model_name}'") if "moecl.promotion" in v.tags]
    if not judged:
        return None
    newest = max(judged, key=lambda v: int(v.version))
    return {"version": newest.version, "promotion": newest.tags["moecl.promotion"],
            "reasons": newest.tags.get("moecl.rejection_reasons", "")}
