"""Launch one pipeline run for one data version: embedded (kfp.local) or on a Kubeflow cluster.

The launcher opens the run's MLflow run first, so the data version counts as taken before any step
starts, and passes the registry's current champion as the run's parent.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moecl.backbone import DTYPES
from moecl.config import TrainConfig, config_from_dict
from moecl.mlops import registry, steps
from moecl.mlops.gate import GateThresholds
from moecl.mlops.lifecycle import heartbeating
from moecl.mlops.validation import ValidationRules
from moecl.mlops.versioning import DataVersion

from . import shipped
from .containers import StepContainers
from .pipeline import build

SETTINGS = Path(__file__).with_name("settings.yaml")  # the demo's small budget
# The production settings' ConfigMap (infra/k8s/base), carried by the package: `compile` reads it; a
# trigger on the cluster passes the mounted ConfigMap with --settings instead.
PRODUCTION_SETTINGS = shipped("infra") / "k8s" / "base" / "pipeline-settings.yaml"
from components import CLUSTER_SETTINGS as CLUSTER
log = logging.getLogger("moecl.launcher")


@dataclass
class PipelineSettings:
    model_name: str = "moecl"
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path = SETTINGS) -> "PipelineSettings":
        return cls.parse(yaml.safe_load(Path(path).read_text()) or {}, path)

    @classmethod
    def from_configmap(cls, path: str | Path) -> "PipelineSettings":
        """The settings a ConfigMap manifest holds under `settings.yaml` (as mounted for the trigger)."""
        configmap = yaml.safe_load(Path(path).read_text())
        return cls.parse(yaml.safe_load(configmap["data"]["settings.yaml"]), f"{path}: settings.yaml")

    @classmethod
    def parse(cls, raw: dict, path) -> "PipelineSettings":
        unknown = sorted(set(raw) - {"model_name", "training", "validation", "gate"})
        if unknown:
            raise ValueError(f"{path}: unknown key '{unknown[0]}'")
        settings = cls(**raw)
        # Fail now on a bad section, not after validation ran in the pipeline.
        config_from_dict({**settings.training, "tasks": [{"name": "check", "data": "."}]}, source=str(path))
        try:
            ValidationRules(**settings.validation)
            GateThresholds(**settings.gate)
        except TypeError as err:
            raise ValueError(f"{path}: {err}") from None
        return settings


@dataclass
class Workdir:
    """Where an embedded run keeps its state: MLflow (sqlite + artifacts) and KFP outputs/cache."""
    root: Path

    def __post_init__(self):  # absolute: step containers see the folder at the same path
        self.root = Path(self.root).resolve()

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"


def arguments(settings: PipelineSettings, version: DataVersion, tracking_uri: str, run_id: str) -> dict:
    """The run's parameters. The data rules and gate thresholds are not among them: they are compiled
    into the pipeline (`deployed_pipeline`), and a run parameter could only tighten them."""
    return {
        "data_version": version.hash, "data_remote": version.remote, "tracking_uri": tracking_uri, "run_id": run_id,
        "parent_version": registry.alias_version(tracking_uri, settings.model_name, registry.CHAMPION) or "",
        "model_name": settings.model_name, "settings_json": json.dumps(settings.training),
    }


class StepOutput(io.TextIOBase):
    """Where the embedded runner's output goes. KFP's local runner prints every line its step
    processes write (executor inputs, every library's INFO logs, progress bars); all of it is kept
    in a log file, and the terminal gets each step's start and end, moecl's own progress lines,
    each progress bar once it is done, and errors."""

    SHOWN = re.compile(r"Executing task|finished with status|ERROR|Error|Traceback|task=\S+ step=\d+/|after \S+: |"
                       r"is now champion|not promoted")

    def __init__(self, log_file: Path, terminal):
        self.log = log_file.open("a")
        self.terminal = terminal
        self.pending = ""

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            shown = line.split("\r")[-1].rstrip()  # a progress bar: its last state
            bar = shown.startswith(("train ", "eval ")) and "100%" in shown
            if bar or self.SHOWN.search(shown):
                self.terminal.write(f"  {shown.strip()[:200]}\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def close(self) -> None:
        self.log.close()


def run_embedded(version: DataVersion, settings: PipelineSettings, workdir: Workdir, run_id: str,
                 verbose: bool = False, containers: StepContainers | None = None) -> None:
    """Run the whole DAG on this machine, keeping the run's lease while it works: each step a
    subprocess in the current environment, or with `containers` a container of the project's image.
    An interrupted or failed run is marked failed (to be retried); a version refused by validation
    raises Refused. The steps' full output goes to <workdir>/logs/<run id>.log (and to the terminal
    with `verbose`)."""
    from kfp import local

    workdir.root.mkdir(parents=True, exist_ok=True)
    tracking_uri = workdir.tracking_uri
    runner = containers.runner() if containers else local.SubprocessRunner(use_venv=False)
    local.init(runner=runner, pipeline_root=str((workdir.root / "pipeline-root").resolve()), raise_on_error=True)
    in_containers = contextlib.nullcontext()
    if containers:  # the steps write the run's store and read the data remote where the host keeps them
        remote = [] if "://" in version.remote_url else [Path(version.remote_url)]
        in_containers = containers.active(workdir.root / "home", [workdir.root, *remote])
    log_file = workdir.root / "logs" / f"{run_id}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(StepOutput(log_file, sys.stdout))
    try:
        with heartbeating(tracking_uri, run_id), output, in_containers:
            deployed_pipeline(settings)(**arguments(settings, version, tracking_uri, run_id))
    except KeyboardInterrupt:
        steps.fail_run(tracking_uri, run_id, "interrupted")
        raise
    except BaseException:
        steps.fail_run(tracking_uri, run_id)
        tags = registry.connect(tracking_uri).get_run(run_id).data.tags
        if tags.get(registry.TAG_OUTCOME) == "validation_failed":
            raise steps.Refused(version.hash, tags.get(steps.TAG_VALIDATION_ERRORS, "").splitlines()) from None
        if not verbose:
            print(f"  the steps' full output: {log_file}", file=sys.stderr)
        raise


def step_memory(parameters: float, precision: str) -> dict[str, str]:
    """Memory request and limit of a GPU step for a backbone of `parameters` weights: they are read
    into host memory in the training precision before moving to the GPU; the rest is the Python
    process, the tokenizer, the data and the MLflow client. `auto` is sized as fp32, the widest type
    it may resolve to on the node."""
    weights = parameters * DTYPES["fp32" if precision == "auto" else precision].itemsize / 2**30
    return {"memory_request": f"{math.ceil(weights + 6)}Gi", "memory_limit": f"{math.ceil(1.5 * weights + 8)}Gi"}


def production_settings() -> "PipelineSettings":
    return PipelineSettings.from_configmap(PRODUCTION_SETTINGS)


def cluster_settings(production: "PipelineSettings | None" = None) -> tuple[dict, dict, dict]:
    """(GPU step settings, TrainJob settings, Secrets per step) of the cluster: GPU steps sized for
    the backbone of the settings the runs use, in its precision; a TrainJob runs the pipeline's own image."""
    cluster = yaml.safe_load(CLUSTER.read_text())
    production = production or production_settings()
    precision = production.training.get("train", {}).get("precision", TrainConfig.precision)
    gpu = {**cluster["gpu"], **step_memory(float(cluster["gpu"]["backbone_parameters"]), precision),
           "cache_claim": cluster.get("cache_claim")}
    train_job = {"image": cluster["image"], "cache_claim": cluster.get("cache_claim"), **cluster["train_job"]}
    return gpu, train_job, cluster["step_secrets"]


def deployed_pipeline(settings: PipelineSettings, *cluster):
    """The pipeline with these settings' data rules and gate compiled in."""
    return build(*cluster, deployed_rules=settings.validation, deployed_gate=settings.gate)


def cluster_pipeline(settings: "PipelineSettings | None" = None):
    """The pipeline as the cluster runs it: infra/cluster.yaml, and the rules, gate and step sizes of
    `settings` (default: the production settings the package carries)."""
    settings = settings or production_settings()
    return deployed_pipeline(settings, *cluster_settings(settings))


class KubeflowRuns:
    """The cluster's side of a run's lease (moecl.mlops.lifecycle.ClusterRuns), from the Kubeflow
    Pipelines API: whether a run still waits to start, and cancelling one whose lease ran out."""

    def __init__(self, host: str, client=None):
        if client is None:
            import kfp

            client = kfp.Client(host=host)
        self.client = client

    def waiting(self, kfp_run_id: str) -> bool:
        return str(self.client.get_run(kfp_run_id).state) == "PENDING"

    def cancel(self, kfp_run_id: str) -> None:
        try:
            self.client.terminate_run(kfp_run_id)
        except Exception as err:  # it may have ended on its own meanwhile; the MLflow run is failed either way
            log.warning("could not cancel Kubeflow run %s: %s", kfp_run_id, err)


def submit(version: DataVersion, settings: PipelineSettings, host: str, tracking_uri: str, run_id: str,
           experiment: str = "moecl", client=None) -> str:
    """Submit the run to a Kubeflow Pipelines host; train and evaluate go to the GPU node pool. The
    Kubeflow run id is recorded on the MLflow run; the steps keep the run's lease from then on and
    the DAG's exit handler marks it failed if it fails. A submission that fails fails the run at
    once (`submit_failed`), to be retried. Returns the Kubeflow run id."""
    from moecl.mlops.lifecycle import TAG_KFP_RUN

    try:
        if client is None:
            import kfp

            client = kfp.Client(host=host)
        result = client.create_run_from_pipeline_func(cluster_pipeline(settings),
                                                      arguments=arguments(settings, version, tracking_uri, run_id),
                                                      run_name=f"moecl-data-{version.short}", experiment_name=experiment)
    except BaseException:
        steps.fail_run(tracking_uri, run_id, "submit_failed")
        raise
    registry.connect(tracking_uri).set_tag(run_id, TAG_KFP_RUN, result.run_id)
    return result.run_id
