"""Multi-node training as a Kubeflow Trainer v2 TrainJob, submitted and awaited by the pipeline's
train step through the `kubeflow` SDK.

The TrainJob uses a torch-distributed runtime: on every node the runtime's torchrun starts one
process per GPU on `train_in_job`, which joins the job-wide process group (torchrun's environment),
fetches the data version from the DVC remote and the champion from MLflow, and trains with DDP. Rank 0
logs the candidate checkpoint to the pipeline run's MLflow artifacts, where the train step picks it
up: nothing but MLflow and the DVC remote is shared between the step's pod and the job's nodes.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("moecl.trainjob")
CANDIDATE_ARTIFACTS = "candidate"  # the run's artifact folder the job writes the checkpoint to
TRAINER_CONTAINER = "node"  # the container a torch-distributed runtime runs the trainer in
IMAGE_UID = 1000  # the image's user (infra/Dockerfile)
CACHE_DIR = "/home/moecl/.cache"  # the image's XDG_CACHE_HOME: converted backbones (MOECL_CACHE), hub downloads


class TrainJobFailed(RuntimeError):
    """The job failed, was not admitted or started in time, or could not be watched; it was deleted."""


@dataclass
class TrainJobSettings:
    """The cluster side of multi-node training (infra/cluster.yaml, `train_job`)."""
    nodes: int = 1  # more than 1: the train step submits a TrainJob instead of training in its own pod
    runtime: str = "torch-distributed"
    resources_per_node: dict = field(default_factory=lambda: {"gpu": 1})
    image: str | None = None  # default: the runtime's image; the pipeline passes its own (moecl installed)
    namespace: str | None = None  # default: the namespace the step's pod runs in
    timeout_seconds: int = 86400
    # A job whose nodes are not all running by then (not admitted, no capacity) is deleted and fails,
    # rather than holding the train step for `timeout_seconds`.
    start_timeout_seconds: int = 1800
    poll_seconds: int = 30
    max_api_errors: int = 5  # consecutive failed status reads before the job counts as lost
    shm_size: str = "16Gi"  # /dev/shm (memory-backed) for NCCL and DataLoader workers
    cache_claim: str | None = None  # the PVC of backbones, shared by every step (infra/k8s/base/cache.yaml)
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
    """What the runtime's pods need beyond the SDK's defaults: the restricted Pod Security profile the
    namespace enforces (non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp),
    /dev/shm for NCCL, the backbone volume and the Secrets as environment variables."""
    from kubeflow.trainer.options.kubernetes import (ContainerPatch, JobSetSpecPatch, JobSetTemplatePatch,
                                                     JobSpecPatch, JobTemplatePatch, PodSpecPatch, PodTemplatePatch,
                                                     ReplicatedJobPatch, RuntimePatch, TrainingRuntimeSpecPatch)

    env = [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}}
           for name, ref in sorted(settings.secret_env.items())]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if settings.cache_claim:
        volumes.append({"name": "cache", "persistentVolumeClaim": {"claimName": settings.cache_claim}})
        mounts.append({"name": "cache", "mountPath": CACHE_DIR})
    container = ContainerPatch(name=TRAINER_CONTAINER, env=env or None, volume_mounts=mounts, security_context={
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True})
    pod = PodTemplatePatch(spec=PodSpecPatch(containers=[container], volumes=volumes, security_context={
        "runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID,
        "seccompProfile": {"type": "RuntimeDefault"}}))
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


def wait(client, name: str, settings: TrainJobSettings, report: Callable[[str, str], None],
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Block until the TrainJob completes. A few failed status reads in a row are retried (the API
    server restarts, a watch times out); a job that fails, does not start within
    `start_timeout_seconds`, outlives `timeout_seconds` or can no longer be read raises TrainJobFailed
    (with the first node's log tail when there is one). Whatever ends the wait but completion (also
    the step itself being stopped: SIGTERM) deletes the job, so no nodes are left training for nobody."""
    started = clock()
    seen = status_reporter(report)
    errors = 0
    with _deleted_unless_complete(client, name):
        while True:
            try:
                job = client.get_job(name)
                errors = 0
            except Exception as err:  # the SDK wraps every API failure in RuntimeError or its own types
                errors += 1
                if errors >= settings.max_api_errors:
                    raise TrainJobFailed(f"TrainJob {name}: status unreadable {errors} times in a row: {err}") from err
                log.warning("TrainJob %s: status read failed (%d/%d): %s", name, errors, settings.max_api_errors, err)
            else:
                seen(job)
                if job.status == "Complete":
                    return
                if job.status == "Failed":
                    raise TrainJobFailed(f"TrainJob {name} failed\n" + _log_tail(client, name))
                waited = clock() - started
                if job.status != "Running" and waited > settings.start_timeout_seconds:
                    raise TrainJobFailed(f"TrainJob {name} did not start within {settings.start_timeout_seconds}s "
                                         f"(status {job.status}: capacity, quota or admission)")
            if clock() - started > settings.timeout_seconds:
                raise TrainJobFailed(f"TrainJob {name} still running after {settings.timeout_seconds}s")
            sleep(settings.poll_seconds)


def _log_tail(client, name: str, lines: int = 40) -> str:
    try:
        return "\n".join(list(client.get_job_logs(name))[-lines:])
    except Exception as err:
        return f"(no logs: {err})"


class _Stopped(BaseException):
    """SIGTERM while waiting: Kubernetes stops the step's pod (timeout, run terminated, node drained)."""


@contextlib.contextmanager
def _deleted_unless_complete(client, name: str):
    def stop(signum, frame):
        raise _Stopped(f"signal {signum}")

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        yield
    except BaseException as err:
        delete(client, name, reason=repr(err))
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def delete(client, name: str, reason: str = "") -> None:
    """Delete a TrainJob (its JobSet and pods go with it); one already gone is fine."""
    try:
        client.delete_job(name)
        log.warning("TrainJob %s deleted (%s)", name, reason)
    except Exception as err:
        log.warning("TrainJob %s: could not delete it (%s): %s", name, reason, err)
