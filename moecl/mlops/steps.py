"""What each pipeline step does. The KFP components in `components/` only call these, so every step
runs and is tested as plain Python, and the same code serves the embedded and the cluster runs.

All steps of one pipeline run log into one MLflow run, tagged with the data version it processed.
Every step works against the registered version that was champion when the run was launched (its
parent), so a run's result does not depend on what other runs promote meanwhile, and caching by
(data version, parent version) is sound.

Every step runs in a process of its own, so torch, transformers and Great Expectations are imported
only by the steps that use them: importing all three costs each step about 20 s on a small node.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import mlflow

from ..answer_keys import ANSWERS_FILE, examples_key, model_key
from ..config import TASK_NAME_RULE, Config, config_from_dict, is_task_name
from ..data import load_task, per_label
from ..manifest import read_manifest
from ..metrics import automation_coverage, plot_heatmap, stage_tasks, summarise
from . import registry, trainjob
from .gate import STRICTER as GATE_STRICTER
from .gate import GateDecision, GateThresholds, compared_tasks, decide
from .lifecycle import STALE, heartbeating
from .tightening import tighten
from .trainjob import CANDIDATE_ARTIFACTS, TrainJobSettings
from .versioning import DataVersion, ListingError, materialize, task_versions

log = logging.getLogger("moecl.pipeline")


def _timed(step):
    """Keep the run's lease while the step works and log its wall time to the run as
    `seconds.<step>`, pass or fail. Failing to log the time never replaces the step's own error."""
    signature = inspect.signature(step)

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        call = signature.bind(*args, **kwargs).arguments
        tracking_uri, run_id = call["tracking_uri"], call["run_id"]
        started = time.time()
        try:
            with heartbeating(tracking_uri, run_id):
                return step(*args, **kwargs)
        finally:
            try:
                registry.connect(tracking_uri).log_metric(run_id, f"seconds.{step.__name__}", time.time() - started)
            except Exception as err:
                log.warning("could not log the time of step %s: %s", step.__name__, err)
    return wrapper


TRAINING_STATE = "training-state"  # the run's artifact folder holding the train step's checkpoints


TAG_VALIDATION_ERRORS = "moecl.validation_errors"  # a refused version's violations, one per line


class ValidationFailed(RuntimeError):
    """The data version broke a validation rule; the message names the file, rows and rule."""


class Refused(Exception):
    """Validation refused the data version (final: only new data is tried). Carries the violations,
    one line each naming the file, row and rule."""

    def __init__(self, version: str, violations: list[str]):
        super().__init__(f"data version {version[:12]} refused by validation: {len(violations)} violation(s)")
        self.version, self.violations = version, violations


def _refuse(tracking_uri: str, run_id: str, message: str) -> None:
    """End the run as `validation_failed` (the version is processed: only new data is tried again)."""
    registry.connect(tracking_uri).set_tag(run_id, TAG_VALIDATION_ERRORS, message[:5000])
    _end_run(tracking_uri, run_id, "validation_failed", "FAILED")
    raise ValidationFailed("data validation failed:\n" + message)


def run_config(settings: dict, dataset: Path, tasks: list[str]) -> Config:
    """The training config of a pipeline run: the pipeline's settings plus the version's tasks."""
    raw = {**settings, "tasks": [{"name": t, "data": str(dataset / t)} for t in tasks]}
    return config_from_dict(raw, source="pipeline settings")


def _end_run(tracking_uri: str, run_id: str, outcome: str, status: str = "FINISHED") -> None:
    client = registry.connect(tracking_uri)
    client.set_tag(run_id, registry.TAG_OUTCOME, outcome)
    client.set_terminated(run_id, status)


def fail_run(tracking_uri: str, run_id: str, outcome: str = "failed") -> None:
    """Close a run that stopped on an error (validation closes its own with its own outcome); the
    version is retried (see moecl.mlops.lifecycle)."""
    client = registry.connect(tracking_uri)
    if client.get_run(run_id).info.status == "RUNNING":
        _end_run(tracking_uri, run_id, outcome, "FAILED")


def finalize(tracking_uri: str, run_id: str) -> str:
    """The DAG's exit handler: a run that ends without an outcome failed somewhere (a step error, a
    lost pod); mark it failed now rather than when its lease runs out. Returns the run's status."""
    fail_run(tracking_uri, run_id)
    return registry.connect(tracking_uri).get_run(run_id).info.status


@_timed
def validate(tracking_uri: str, model_name: str, parent_version: str, run_id: str, data_remote: str,
             data_version: str, rules: dict, dataset_dir: str, tightened_by: dict | None = None) -> str:
    """Fetch the version and validate every task folder with Great Expectations; the report goes
    to MLflow either way. `rules`: the deployed rules; `tightened_by`: a run's own, applied only
    where stricter. Returns the task versions (JSON); raises ValidationFailed on any failure."""
    from .validation import STRICTER, ValidationRules, validate_task

    checks = tighten(ValidationRules(**rules), tightened_by, STRICTER)

    version = DataVersion(data_version, data_remote)
    try:
        dataset = materialize(version, dataset_dir)
        versions = task_versions(version)
    except ListingError as err:
        _refuse(tracking_uri, run_id, str(err))
    with tempfile.TemporaryDirectory() as scratch:
        best = registry.fetch(tracking_uri, model_name, parent_version, scratch)
        champion_labels = read_manifest(best.checkpoint)["labels"] if best else {}
    reports, failures = {}, []
    for task in sorted(versions):
        if not is_task_name(task):
            failures.append(f"{dataset / task}: folder name {task!r} is not a task name ({TASK_NAME_RULE}): rule task_name")
            continue
        report = validate_task(dataset / task, checks, expected_labels=champion_labels.get(task))
        reports[task] = json.loads(report.to_json())
        if not report.success:
            failures.append(report.summary())
    missing = sorted(set(champion_labels) - set(versions))
    if missing:
        failures.append(f"{dataset}: task folder(s) {missing} of the champion are missing: rule champion_tasks_present")
    client = registry.connect(tracking_uri)
    client.set_tag(run_id, "task_versions", json.dumps(versions))
    with registry.logging_to(tracking_uri, run_id):
        mlflow.log_dict(reports, "validation/great_expectations.json")
        mlflow.log_params({"data_version": data_version, "tasks": ",".join(sorted(versions))})
        _log_dataset(version, versions, dataset)
    if failures:
        _refuse(tracking_uri, run_id, "\n".join(failures))
    return json.dumps(versions)


def _log_dataset(version: DataVersion, versions: dict[str, str], dataset: Path) -> None:
    """The DVC data version as the run's MLflow dataset input: one row per task with its digest and sizes."""
    import pandas as pd

    rows = []
    for task, digest in sorted(versions.items()):
        files = {split: dataset / task / f"{split}.jsonl" for split in ("train", "test")}
        counts = {split: sum(1 for line in path.open("rb") if line.strip()) if path.is_file() else 0  # bytes: bad data too
                  for split, path in files.items()}
        rows.append({"task": task, "task_version": digest, **counts})
    table = mlflow.data.from_pandas(pd.DataFrame(rows), source=version.remote_url, name=f"data-{version.short}",
                                    digest=version.hash[:36])
    mlflow.log_input(table, context="training", tags={"dvc_version": version.hash})


def plan_tasks(versions: dict[str, str], best: registry.Champion | None) -> tuple[list[str], list[str], list[str]]:
    """(all tasks in model order, new tasks, changed tasks) for this data version against the champion."""
    known = read_manifest(best.checkpoint)["tasks"] if best else []
    new = sorted(set(versions) - set(known))
    changed = [t for t in known if best and best.task_versions.get(t) != versions.get(t)]
    return known + new, new, changed


def _fetch_training_state(tracking_uri: str, run_id: str, run_dir: Path) -> bool:
    """Bring back what an earlier attempt of this run's train step saved (its stage and mid-stage
    checkpoints, kept in the run's artifacts); whether there was any."""
    if not registry.connect(tracking_uri).list_artifacts(run_id, TRAINING_STATE):
        return False
    fetched = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TRAINING_STATE,
                                                  dst_path=str(run_dir.parent / "fetched"), tracking_uri=tracking_uri)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.move(fetched, run_dir)
    return True


def _train_candidate(tracking_uri: str, model_name: str, parent_version: str, settings: dict, dataset: Path,
                     versions: dict[str, str], scratch: Path, processes: int = 1, run_id: str | None = None,
                     ) -> tuple[Path, dict]:
    """Continue the champion (or start fresh) with the version's new and changed tasks, in this
    process (in every process of a job when torchrun started this one) or, with `processes` > 1,
    in that many torchrun processes. Returns the candidate's checkpoint and the training summary.

    With `run_id` (one process), every checkpoint is also kept in the run's artifacts, and a
    retried step resumes from them: finished stages are not trained again, an interrupted one
    continues from its last mid-stage checkpoint."""
    from ..distributed import torchrun
    from ..trainer import Trainer

    best = registry.fetch(tracking_uri, model_name, parent_version, scratch)
    order, new, changed = plan_tasks(versions, best)
    cfg, run_dir = run_config(settings, dataset, order), scratch / "run"
    start = best.checkpoint if best else None
    if processes > 1:
        metrics = torchrun(cfg.to_dict(), run_dir, processes, start)
    else:
        resumed = run_id is not None and _fetch_training_state(tracking_uri, run_id, run_dir)
        if resumed and (run_dir / "checkpoint" / "manifest.json").is_file():
            start = run_dir / "checkpoint"  # this run's own stages so far, on top of the champion
        trainer = Trainer(cfg, run_dir)
        trainer.resuming = resumed
        if run_id is not None:
            client = registry.connect(tracking_uri)
            trainer.on_checkpoint = lambda folder: client.log_artifacts(run_id, str(folder), f"{TRAINING_STATE}/{folder.name}")
        metrics = trainer.extend(read_manifest(start)) if start else trainer.run(resume=resumed)
    summary = {"new_tasks": new, "changed_tasks": changed, "parent_champion": best.version if best else None,
               "train_seconds": metrics["train_seconds"], "scoring_seconds": metrics["scoring_seconds"]}
    return run_dir / "checkpoint", summary


def train_in_job(tracking_uri: str, model_name: str, parent_version: str, run_id: str, settings: dict,
                 data_remote: str, data_version: str, task_versions_json: str) -> None:
    """One process of a multi-node TrainJob (see moecl.mlops.trainjob): every process fetches the data
    version and the champion itself; rank 0 logs the candidate and its summary to the run."""
    from ..distributed import join

    world = join(settings.get("train", {}).get("device", "auto"))
    with tempfile.TemporaryDirectory() as scratch:
        dataset = materialize(DataVersion(data_version, data_remote), Path(scratch) / "data")
        checkpoint, summary = _train_candidate(tracking_uri, model_name, parent_version, settings, dataset,
                                               json.loads(task_versions_json), Path(scratch))
        if world.main:
            with registry.logging_to(tracking_uri, run_id):
                mlflow.log_artifacts(str(checkpoint), CANDIDATE_ARTIFACTS)
                mlflow.log_dict(summary, f"{CANDIDATE_ARTIFACTS}-summary.json")


TAG_TRAINJOB = "trainjob.name"


def _train_on_nodes(tracking_uri: str, model_name: str, parent_version: str, run_id: str, settings: dict,
                    data_remote: str, data_version: str, task_versions_json: str, job: TrainJobSettings,
                    model_dir: str, client=None) -> dict:
    """Submit the TrainJob, report its status to this step's log and the run's tags, and fetch the
    candidate it logged. `client`: a kubeflow TrainerClient (default: the cluster's, in-cluster config)."""
    if client is None:
        from kubeflow.common.types import KubernetesBackendConfig
        from kubeflow.trainer import TrainerClient

        client = TrainerClient(KubernetesBackendConfig(namespace=job.namespace))
    tracking = registry.connect(tracking_uri)
    args = {"tracking_uri": tracking_uri, "model_name": model_name, "parent_version": parent_version, "run_id": run_id,
            "settings": settings, "data_remote": data_remote, "data_version": data_version,
            "task_versions_json": task_versions_json}
    earlier = tracking.get_run(run_id).data.tags.get(TAG_TRAINJOB)
    if earlier:  # a retry of this step: the attempt that was killed may have left its job running
        trainjob.delete(client, earlier, reason="the train step was retried")
    name = trainjob.submit(client, job, args)
    tracking.set_tag(run_id, TAG_TRAINJOB, name)

    def report(part: str, state: str) -> None:
        log.info("TrainJob %s: %s %s", name, part, state)
        tracking.set_tag(run_id, f"trainjob.status.{part}", state)

    trainjob.wait(client, name, job, report)
    with tempfile.TemporaryDirectory() as scratch:
        fetched = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CANDIDATE_ARTIFACTS,
                                                      dst_path=scratch, tracking_uri=tracking_uri)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(fetched, model_dir)
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{CANDIDATE_ARTIFACTS}-summary.json")


@_timed
def train(tracking_uri: str, model_name: str, parent_version: str, run_id: str, settings: dict, dataset_dir: str,
          task_versions_json: str, model_dir: str, data_remote: str = "", data_version: str = "",
          train_job: dict | None = None, client=None) -> dict:
    """Continue the champion (or start fresh) with the version's new and changed tasks: on every
    GPU of this pod (torchrun, one process per GPU), or over several nodes as a Kubeflow TrainJob
    when `train_job` asks for more than one node."""
    import torch

    job = TrainJobSettings.from_dict(train_job)
    if job.nodes > 1:
        summary = _train_on_nodes(tracking_uri, model_name, parent_version, run_id, settings, data_remote,
                                  data_version, task_versions_json, job, model_dir, client)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint, summary = _train_candidate(tracking_uri, model_name, parent_version, settings, Path(dataset_dir),
                                                   json.loads(task_versions_json), Path(scratch),
                                                   processes=torch.cuda.device_count(), run_id=run_id)
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.copytree(checkpoint, model_dir)
    with registry.logging_to(tracking_uri, run_id):
        mlflow.log_params({k: json.dumps(v) for k, v in summary.items() if not k.endswith("_seconds")})
        mlflow.log_params(flat_params(run_config(settings, Path("."), ["settings"]).to_dict()))
        mlflow.log_metrics({"train_seconds": summary["train_seconds"], "train_scoring_seconds": summary["scoring_seconds"]})
        trained = set(summary["new_tasks"] + summary["changed_tasks"])  # the model's earlier stages were other runs'
        _log_curve([p for p in read_manifest(Path(model_dir))["progress"].get("curve", []) if p["stage"] in trained])
    return summary


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: {"train.lr": "0.001", ...} (task folders left out: they are the data)."""
    flat = {}
    for key, value in tree.items():
        if key == "tasks":
            continue
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def _log_curve(curve: list[dict]) -> None:
    """Per-step training curves (loss, discriminator loss and accuracy, lr), numbered across stages."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"train.{key}", value, now, index) for index, point in enumerate(curve, start=1)
               for key, value in point.items() if key not in ("stage", "step")]
    client = mlflow.tracking.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


ANSWERS_ARTIFACT = "evaluation/answers.json"  # a candidate's per-example answers, reused once it is champion


def _answers(checkpoint: Callable[[], Path], dataset: Path, tasks: list[str], settings: Config,
             known: dict | None = None, known_model: bool = False) -> dict[str, dict]:
    """Per task, whether each test example (the same ones for every model) is answered right and how
    sure each answer is (the label margin), with the keys they were computed under (moecl.answer_keys):
    {"model", "data", "correct", "margins"}. An entry of `known` is reused when both keys match; with
    `known_model` (the champion's own recorded answers) the data key alone decides, so a champion
    whose answers all stand is not even loaded. `checkpoint` is called for the model's folder only
    when something must be scored."""
    from ..checkpoint import load_model
    from ..scoring import rank_labels

    known, result = known or {}, {}
    model_and_prompts = functools.cache(lambda: load_model(checkpoint())[:2])
    for task in tasks:
        data = load_task(task, dataset / task)
        examples = per_label(data.test, settings.eval.max_per_label, settings.train.seed)
        data_key, entry = examples_key(task, data.labels, examples, settings), known.get(task)
        stands = entry is not None and entry["data"] == data_key
        key = None if stands and known_model else model_key(model_and_prompts()[0], task)
        if stands and (known_model or entry["model"] == key):
            result[task] = {**entry, "reused": True}
            continue
        model, prompts = model_and_prompts()
        predicted, sure = rank_labels(model, prompts[task], [e.text for e in examples], settings.eval.batch_size,
                                      progress=True)
        answers = prompts[task].labels  # by name: a champion may know an older label set of the task
        result[task] = {"model": key, "data": data_key, "reused": False, "margins": sure,
                        "correct": [answers[p] == data.labels[e.label] for p, e in zip(predicted, examples)]}
    return result


def _recorded_answers(tracking_uri: str, model_name: str, version: str) -> dict:
    """The answers a registered version gave at its own evaluation (none for versions older than that)."""
    run_id = registry.connect(tracking_uri).get_model_version(model_name, version).run_id
    try:
        with tempfile.TemporaryDirectory() as scratch:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ANSWERS_ARTIFACT, dst_path=scratch,
                                                       tracking_uri=tracking_uri)
            return json.loads(Path(path).read_text())
    except (mlflow.exceptions.MlflowException, OSError):
        return {}


def _mean(correct: dict[str, list[bool]]) -> dict[str, float]:
    return {task: sum(c) / len(c) for task, c in correct.items()}


@_timed
def evaluate(tracking_uri: str, model_name: str, parent_version: str, run_id: str, settings: dict, dataset_dir: str, model_dir: str,
             train_summary: dict, evaluation_path: str) -> dict:
    """Accuracy on every task seen so far for the candidate and, on the same test data, the champion."""
    dataset, candidate_dir = Path(dataset_dir), Path(model_dir)
    manifest = read_manifest(candidate_dir)
    tasks = manifest["tasks"]
    cfg = run_config(settings, dataset, tasks)
    # The champion's answers recorded at its registration: the candidate's tasks that read tensors equal
    # to the champion's (old tasks, frozen) and the champion's own tasks on unchanged test data reuse them.
    recorded = _recorded_answers(tracking_uri, model_name, parent_version) if parent_version else {}
    # The train step's own scores of the candidate (the tasks it trained or rescored), kept beside its manifest.
    scored_in_training = candidate_dir / ANSWERS_FILE
    trained = json.loads(scored_in_training.read_text()) if scored_in_training.is_file() else {}
    candidate_answers = _answers(lambda: candidate_dir, dataset, tasks, cfg, known={**recorded, **trained})
    champion_answers = None
    with tempfile.TemporaryDirectory() as scratch:
        fetched = functools.cache(lambda: registry.fetch(tracking_uri, model_name, parent_version, scratch).checkpoint)
        if parent_version:
            champion_tasks = list(recorded) or read_manifest(fetched())["tasks"]
            champion_answers = _answers(fetched, dataset, champion_tasks, cfg, known=recorded, known_model=True)
    candidate_correct = {t: a["correct"] for t, a in candidate_answers.items()}
    candidate_margins = {t: a["margins"] for t, a in candidate_answers.items()}
    champion_correct = champion_answers and {t: a["correct"] for t, a in champion_answers.items()}
    candidate, champion = _mean(candidate_correct), champion_correct and _mean(champion_correct)
    automation = {t: automation_coverage(candidate_margins[t], candidate_correct[t], cfg.eval.automation_precision)[0]
                  for t in tasks}
    matrix = manifest["progress"]["matrix"]
    stages = stage_tasks(manifest["progress"]["training"], matrix)
    summary = summarise(tasks, matrix, stages=stages)
    evaluation = {**summary, "candidate": candidate, "candidate_aa": sum(candidate.values()) / len(candidate),
                  "candidate_correct": candidate_correct, "champion_correct": champion_correct,
                  "automation": automation, "automation_precision": cfg.eval.automation_precision,
                  "champion": champion, "champion_version": parent_version or None,
                  "reused": {"candidate": [t for t, a in candidate_answers.items() if a["reused"]],
                             "champion": [t for t, a in (champion_answers or {}).items() if a["reused"]]},
                  "champion_aa": sum(champion.values()) / len(champion) if champion else None,
                  "chance": {t: 1 / len(manifest["labels"][t]) for t in tasks},
                  "trained_tasks": train_summary["changed_tasks"] + train_summary["new_tasks"],
                  "parent_champion": train_summary["parent_champion"]}
    Path(evaluation_path).parent.mkdir(parents=True, exist_ok=True)
    Path(evaluation_path).write_text(json.dumps(evaluation, indent=2))
    with registry.logging_to(tracking_uri, run_id), tempfile.TemporaryDirectory() as scratch:
        mlflow.log_metrics({"aa": evaluation["candidate_aa"], **({"bwt": summary["bwt"]} if summary["bwt"] is not None else {})})
        mlflow.log_metrics({f"accuracy.{t}": a for t, a in candidate.items()})
        mlflow.log_metrics({f"automation.{t}": a for t, a in automation.items()})  # share decided alone at the precision
        # The newest task cannot have forgotten anything yet: logged as 0 so every task has a series.
        mlflow.log_metrics({f"forgetting.{t}": summary["forgetting"].get(t, 0.0) for t in tasks})
        if champion:
            mlflow.log_metrics({f"champion_accuracy.{t}": a for t, a in champion.items()})
            mlflow.log_metric("champion_aa", evaluation["champion_aa"])
        heatmap = Path(scratch) / "accuracy_matrix.png"
        plot_heatmap(tasks, matrix, heatmap, "accuracy after each stage", stages and ["+".join(s) for s in stages])
        mlflow.log_artifact(str(heatmap), "evaluation")
        mlflow.log_dict(evaluation, "evaluation/evaluation.json")
        mlflow.log_dict({t: {k: v for k, v in a.items() if k != "reused"} for t, a in candidate_answers.items()},
                        ANSWERS_ARTIFACT)
    return evaluation


@_timed
def register(tracking_uri: str, model_name: str, run_id: str, model_dir: str, evaluation: dict, data_version: str,
             task_versions_json: str, method: str) -> str:
    tags = {
        "data_version": data_version, "task_versions": task_versions_json, "git_commit": registry.git_commit(),
        "method": method, "aa": f"{evaluation['candidate_aa']:.4f}",
        "bwt": "n/a" if evaluation["bwt"] is None else f"{evaluation['bwt']:.4f}",
        "accuracy": json.dumps(evaluation["candidate"]),
        "parent_champion_version": str(evaluation["parent_champion"] or "none"),
    }
    return registry.register(tracking_uri, model_name, run_id, model_dir, tags)


def model_card(version: str, evaluation: dict, decision: GateDecision) -> str:
    """The run's and the model version's description (markdown): what it knows, from which data,
    how well, and what the gate decided. The champion's tasks this run left alone are compared
    with the champion on the same examples; the tasks it trained are judged on their own."""
    champion, trained = evaluation.get("champion") or {}, evaluation["trained_tasks"]
    candidate, chance = evaluation["candidate"], evaluation.get("chance", {})
    compared = compared_tasks(champion, trained)
    lines = [f"## moecl version {version}", "",
             f"Trained tasks this run: {', '.join(trained) or 'none'}; parent champion: "
             f"{evaluation['parent_champion'] or 'none'}.", ""]
    if compared:
        lines += ["Kept from the champion (same test examples):", "", "| task | accuracy | champion's |", "|---|---|---|",
                  *(f"| {t} | {candidate[t]:.3f} | {champion[t]:.3f} |" for t in compared), "",
                  f"AA on these tasks: {sum(candidate[t] for t in compared) / len(compared):.3f} "
                  f"(champion {sum(champion[t] for t in compared) / len(compared):.3f}).", ""]
    if trained:
        lines += ["Trained this run (judged on their own):", "", "| task | accuracy | chance |", "|---|---|---|",
                  *(f"| {t} | {candidate[t]:.3f} | {chance[t]:.3f} |" if t in chance else f"| {t} | {candidate[t]:.3f} | |"
                    for t in trained), ""]
    verdict = "promoted to champion" if decision.passed else "rejected: " + "; ".join(decision.reasons)
    lines.append(f"AA over all tasks {evaluation['candidate_aa']:.3f}. Gate: {verdict}.")
    return "\n".join(lines)


@_timed
def promote(tracking_uri: str, model_name: str, run_id: str, version: str, evaluation: dict,
            thresholds: dict, tightened_by: dict | None = None) -> dict:
    """The gate: pass -> `champion` moves to this version; fail -> aliases untouched, reasons tagged.
    `thresholds`: the deployed gate; `tightened_by`: a run's own, applied only where stricter."""
    gate = tighten(GateThresholds(**thresholds), tightened_by, GATE_STRICTER)
    decision = decide(evaluation["candidate_correct"], evaluation["champion_correct"], evaluation["trained_tasks"],
                      gate, evaluation.get("automation"), evaluation.get("chance"))
    client = registry.connect(tracking_uri)
    previous, outcome = None, "promoted" if decision.passed else "rejected"
    if decision.passed:
        parent = evaluation["parent_champion"]
        seq = client.get_run(run_id).data.tags.get(registry.TAG_DATA_SEQ)
        try:
            previous = registry.promote(tracking_uri, model_name, version, None if parent is None else str(parent),
                                        f"pipeline run {run_id}", "passed the gate", int(seq) if seq else None)
        except registry.Superseded as err:  # final: the champion already holds newer data
            decision, outcome = GateDecision(False, [str(err)]), "superseded"
        except registry.StaleChampion as err:  # not final: the version is trained again from the new champion
            decision, outcome = GateDecision(False, [str(err)]), STALE
    with registry.logging_to(tracking_uri, run_id):
        mlflow.log_params(flat_params(asdict(gate), "gate."))
    card = model_card(version, evaluation, decision)
    client.set_tag(run_id, "mlflow.note.content", card)
    client.update_model_version(model_name, version, description=card)
    client.set_model_version_tag(model_name, version, "moecl.promotion", outcome)
    if decision.passed:
        log.info("version %s is now champion (previous: %s)", version, previous)
    else:
        client.set_model_version_tag(model_name, version, "moecl.rejection_reasons", "; ".join(decision.reasons))
        log.warning("version %s not promoted (%s): %s", version, outcome, "; ".join(decision.reasons))
    _end_run(tracking_uri, run_id, outcome)
    return {**asdict(decision), "version": version, "previous_champion": previous}
