"""Multi-node training as a Kubeflow Trainer v2 TrainJob, submitted and awaited by the pipeline's
train step through the `kubeflow` SDK.

The TrainJob uses a torch-distributed runtime: on every node the runtime's torchrun starts one
process per GPU on `train_in_job`, which joins the job-wide process group (torchrun's environment),
fetches the data version from the DVC remote and the champion from MLflow, and trains with DDP. Rank 0
logs the candidate checkpoint to the pipeline run's MLflow artifacts, where the train step picks it
up: nothing but MLflow and the DVC remote is shared between the step's pod and the job's nodes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("moecl.trainjob")
CANDIDATE_ARTIFACTS = "candidate"  # the run's artifact folder the job writes the checkpoint to
TRAINER_CONTAINER = "node"  # the container a torch-distributed runtime runs the trainer in


@dataclass
class TrainJobSettings:
    """The cluster side of multi-node training (infra/cluster.yaml, `train_job`)."""
    nodes: int = 1  # more than 1: the train step submits a TrainJob instead of training in its own pod
    runtime: str = "torch-distributed"
    resources_per_node: dict = field(default_factory=lambda: {"gpu": 1})
    image: str | None = None  # default: the runtime's image; the pipeline passes its own (moecl installed)
    namespace: str | None = None  # default: the namespace the step's pod runs in
    timeout_seconds: int = 86400
    poll_seconds: int = 30
    env: dict[str, str] = field(default_factory=dict)  # plain settings (S3 endpoint, region, ...)
    # Variables read from Kubernetes Secrets: {NAME: {name: <secret>, key: <key>}} (hub token, S3 keys)
    secret_env: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict | None) -> "TrainJobSettings":
        return cls(**(raw or {}))


def train_in_job(payload: str) -> None:
    """The TrainJob's function: it hands over to the installed moecl. The SDK ships this source
    into the job's command inside an unquoted shell here-document, so the step's arguments come as
    one base64 string of their JSON (nothing in it a shell expands) and are decoded here."""
    import base64
    import json

    from moecl.mlops.steps import train_in_job as run

    run(**json.loads(base64.b64decode(payload)))


def encode_arguments(step_args: dict) -> str:
    """The step's arguments as train_in_job's payload: any value (quotes, dollars, newlines) survives."""
    import base64
    import json

    return base64.b64encode(json.dumps(step_args).encode()).decode("ascii")


def _options(settings: TrainJobSettings) -> list:
    from kubeflow.trainer.options.kubernetes import (ContainerPatch, JobSetSpecPatch, JobSetTemplatePatch,
                                                     JobSpecPatch, JobTemplatePatch, PodSpecPatch, PodTemplatePatch,
                                                     ReplicatedJobPatch, RuntimePatch, TrainingRuntimeSpecPatch)

    if not settings.secret_env:
        return []
    env = [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}}
           for name, ref in sorted(settings.secret_env.items())]
    pod = PodTemplatePatch(spec=PodSpecPatch(containers=[ContainerPatch(name=TRAINER_CONTAINER, env=env)]))
    job = ReplicatedJobPatch(name=TRAINER_CONTAINER, template=JobTemplatePatch(spec=JobSpecPatch(template=pod)))
    spec = TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=[job])))
    return [RuntimePatch(training_runtime_spec=spec)]


def submit(client, settings: TrainJobSettings, step_args: dict) -> str:
    """Create the TrainJob that runs `train_in_job(**step_args)` on `settings.nodes` nodes; returns its name."""
    from kubeflow.trainer import CustomTrainer

    trainer = CustomTrainer(func=train_in_job, func_args={"payload": encode_arguments(step_args)}, image=settings.image, num_nodes=settings.nodes,
                            resources_per_node=settings.resources_per_node, env=settings.env or None)
    name = client.train(runtime=client.get_runtime(settings.runtime), trainer=trainer, options=_options(settings))
    log.info("TrainJob %s submitted: %d nodes x %s", name, settings.nodes, settings.resources_per_node)
    return name


def status_reporter(report: Callable[[str, str], None]) -> Callable:
    """A wait callback that reports each change of the TrainJob's status (and its steps') once."""
    seen: dict[str, str] = {}

    def callback(job) -> None:
        states = {"trainjob": job.status, **{step.name: step.status or "Pending" for step in job.steps}}
        for key, state in states.items():
            if seen.get(key) != state:
                seen[key] = state
                report(key, state)
    return callback


def wait(client, name: str, settings: TrainJobSettings, report: Callable[[str, str], None]) -> None:
    """Block until the TrainJob completes; raise with the first node's log tail when it fails."""
    try:
        client.wait_for_job_status(name, status={"Complete"}, timeout=settings.timeout_seconds,
                                   polling_interval=settings.poll_seconds, callbacks=[status_reporter(report)])
    except RuntimeError as err:
        tail = list(client.get_job_logs(name))[-40:]
        raise RuntimeError(f"TrainJob {name} failed: {err}\n" + "\n".join(tail)) from err
