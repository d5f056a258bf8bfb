"""Multi-node training as a Kubeflow Trainer TrainJob: the object the SDK would send to the cluster,
the status reports, the compiled pipeline's train step, and the train step's whole round trip with
the job's function run here (no cluster: only the Kubernetes API calls are replaced)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from kubeflow.trainer import TrainerClient
from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
from kubeflow.trainer.types import types
from kubernetes.client import ApiException

from moecl.manifest import read_manifest
from moecl.mlops import registry, steps, trainjob
from moecl.mlops.lifecycle import Policy, claim
from moecl.mlops.versioning import init_project, snapshot, task_versions
from pipelines.launcher import cluster_settings
from pipelines.pipeline import build

from .conftest import write_task

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text())
# The torch-distributed ClusterTrainingRuntime as Kubeflow Trainer v2 installs it (the fields the SDK reads).
TORCH_RUNTIME = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
        "template": {"spec": {"replicatedJobs": [{
            "name": "node", "replicas": 1,
            "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                         "spec": {"template": {"spec": {"containers": [
                             {"name": "node", "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime"}]}}}},
        }]}},
    },
}


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self, timeout=None):
        return self.value


class ClusterApi:
    """The Kubernetes custom-objects API of a cluster holding the torch-distributed runtime: records
    what would be created."""

    def __init__(self):
        self.created: list[dict] = []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, async_req=False):
        raise ApiException(status=404)  # no namespaced runtime: the SDK falls back to the cluster's

    def get_cluster_custom_object(self, group, version, plural, name, async_req=False):
        assert name == "torch-distributed"
        return _Done(TORCH_RUNTIME)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append({"namespace": namespace, "plural": plural, "body": body})


def cluster_client(api) -> TrainerClient:
    backend = KubernetesBackend.__new__(KubernetesBackend)  # skips connecting to a cluster
    backend.namespace, backend.custom_api = "moecl", api
    client = TrainerClient.__new__(TrainerClient)
    client.backend = backend
    return client


def _settings(**overrides) -> trainjob.TrainJobSettings:
    return trainjob.TrainJobSettings.from_dict({"image": CLUSTER["image"], **CLUSTER["train_job"], **overrides})


def test_the_trainjob_runs_moecl_on_every_node_with_the_clusters_settings():
    api = ClusterApi()
    settings = _settings(nodes=2)
    args = {"run_id": "abc123", "data_version": "f00d", "settings": {"method": "moecl"}}
    name = trainjob.submit(cluster_client(api), settings, args)

    [created] = api.created
    job = created["body"]
    assert created["plural"] == "trainjobs" and job["kind"] == "TrainJob" and job["metadata"]["name"] == name
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["image"] == CLUSTER["image"]
    limits = trainer["resourcesPerNode"]["limits"]
    assert limits["nvidia.com/gpu"] == settings.resources_per_node["gpu"]
    script = " ".join(trainer["command"])
    assert "torchrun" in script and "def train_in_job(payload: str)" in script
    assert trainjob.encode_arguments(args) in script and "pip install" not in script  # the image already has moecl
    assert {e["name"]: e["value"] for e in trainer["env"]} == settings.env
    [patch] = spec["runtimePatches"]
    container = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert container["name"] == "node" and secrets["HF_TOKEN"] == {"name": "moecl-hf-token", "key": "HF_TOKEN"}
    assert all("value" not in e for e in container["env"])  # credentials are referenced, never inlined


def test_any_argument_value_reaches_the_job_unchanged_and_nothing_in_it_runs(tmp_path):
    """The SDK writes the job's function into an unquoted here-document: run that very command (its
    entrypoint swapped for `cat`) and read back what the job's Python would get."""
    import ast
    import base64
    import subprocess

    api = ClusterApi()
    hostile = {"data_remote": f"s3://bucket/$(touch {tmp_path}/pwned)/`touch {tmp_path}/pwned2`",
               "settings": {"note": "it's \"quoted\"\n$HOME ${PATH} \\n"}, "run_id": "r1"}
    trainjob.submit(cluster_client(api), _settings(nodes=2), hostile)
    command = api.created[0]["body"]["spec"]["trainer"]["command"]
    assert command[:2] == ["bash", "-c"]
    lines = command[2].rstrip().splitlines()
    entry = lines[-1].split()  # torchrun ... "<file>"
    shown = "\n".join(lines[:-1] + [f"cat {entry[-1]}"])
    script = subprocess.run(["bash", "-c", shown], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    call = ast.parse(script).body[-1].value
    assert call.func.id == "train_in_job"
    [(key, payload)] = ast.literal_eval(call.keywords[0].value).items()
    assert key == "payload" and json.loads(base64.b64decode(payload)) == hostile
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    compile(script, "train_in_job.py", "exec")  # the shipped source itself came through the shell intact


def test_status_changes_are_reported_once_each():
    seen = []
    report = trainjob.status_reporter(lambda part, state: seen.append((part, state)))
    runtime = types.Runtime("torch-distributed", types.RuntimeTrainer(types.TrainerType.CUSTOM_TRAINER, "torch", "img"),
                            types.RuntimeKind.CLUSTER_TRAINING_RUNTIME)

    def job(status, *steps):
        return types.TrainJob("j", runtime, [types.Step(n, s, f"pod-{n}") for n, s in steps], 2, datetime.now(), status)

    for state in (job("Created", ("node-0", None)), job("Running", ("node-0", "Running"), ("node-1", "Running")),
                  job("Running", ("node-0", "Running"), ("node-1", "Running")),
                  job("Complete", ("node-0", "Succeeded"), ("node-1", "Succeeded"))):
        report(state)
    assert seen == [("trainjob", "Created"), ("node-0", "Pending"), ("trainjob", "Running"), ("node-0", "Running"),
                    ("node-1", "Running"), ("trainjob", "Complete"), ("node-0", "Succeeded"), ("node-1", "Succeeded")]


def test_multi_node_training_takes_the_train_step_off_the_gpu_pool(tmp_path):
    from kfp import compiler

    out = tmp_path / "pipeline.yaml"
    gpu, job, secrets = cluster_settings()
    compiler.Compiler().compile(build(gpu, {**job, "nodes": 4}, secrets), str(out))
    spec, _ = yaml.safe_load_all(out.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert "accelerator" not in executors["exec-train"]["container"].get("resources", {})
    assert "accelerator" in executors["exec-evaluate"]["container"]["resources"]
    # The TrainJob settings are a constant of the train task, not a run parameter that could ask for
    # one node of a pipeline compiled to train off the GPU pool.
    assert "train_job_json" not in spec["root"]["inputDefinitions"]["parameters"]
    train_inputs = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert json.loads(train_inputs["train_job_json"]["runtimeValue"]["constant"])["nodes"] == 4


class LocalNodes:
    """A TrainerClient whose 'cluster' runs the job's function here, in this process (one node of one
    process): everything but the Kubernetes API is the real path."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.deleted: list[str] = []

    def get_runtime(self, name):
        return name

    def train(self, runtime, trainer, options):
        name = f"job{len(self.jobs)}"
        self.jobs[name] = {"runtime": runtime, "nodes": trainer.num_nodes}
        trainer.func(**trainer.func_args)
        return name

    def get_job(self, name):
        return _job(name, "Complete")

    def delete_job(self, name):
        self.deleted.append(name)


def _job(name: str, status: str) -> types.TrainJob:
    step = {"Complete": "Succeeded", "Failed": "Failed", "Running": "Running"}.get(status, "Pending")
    return types.TrainJob(name, None, [types.Step("node-0", step, "p")], 2, datetime.now(), status)


def test_the_train_step_gets_its_candidate_from_a_multi_node_job(tmp_path):
    project = init_project(tmp_path / "project", tmp_path / "remote")
    write_task(project / "data" / "topics", ["sports", "science", "politics"])
    version = snapshot(project)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = claim(tracking_uri, version.hash, Policy(), str(tmp_path / "artifacts"))
    settings = {"backbone": "tiny-random-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "max_length": 64}}
    nodes = LocalNodes()
    summary = steps.train(tracking_uri, "moecl", "", run_id, settings, "", json.dumps(task_versions(version)),
                          str(tmp_path / "model"), version.remote, version.hash, {"nodes": 2}, client=nodes)

    assert nodes.jobs == {"job0": {"runtime": "torch-distributed", "nodes": 2}}
    assert summary["new_tasks"] == ["topics"] and summary["train_seconds"] > 0
    assert read_manifest(tmp_path / "model")["tasks"] == ["topics"]  # the job's checkpoint, fetched from MLflow
    tags = registry.connect(tracking_uri).get_run(run_id).data.tags
    assert tags["trainjob.name"] == "job0" and tags["trainjob.status.trainjob"] == "Complete"
    assert nodes.deleted == []  # a completed job is left to the TrainJob's own clean-up

    # The step retried (its first pod was killed): the first attempt's job is deleted before the next.
    steps.train(tracking_uri, "moecl", "", run_id, settings, "", json.dumps(task_versions(version)),
                str(tmp_path / "model"), version.remote, version.hash, {"nodes": 2}, client=nodes)
    assert nodes.deleted == ["job0"] and list(nodes.jobs) == ["job0", "job1"]


def test_a_failed_job_fails_the_step_with_the_nodes_log_and_is_deleted():
    class FailingNodes(LocalNodes):
        def get_job(self, name):
            return _job(name, "Failed")

        def get_job_logs(self, name):
            return iter(["loading backbone", "CUDA out of memory"])

    nodes = FailingNodes()
    with pytest.raises(trainjob.TrainJobFailed, match="(?s)job9.*CUDA out of memory"):
        trainjob.wait(nodes, "job9", _settings(nodes=2), lambda *_: None)
    assert nodes.deleted == ["job9"]


class ScriptedNodes(LocalNodes):
    """A cluster whose status reads follow a script: a status, or an exception to raise."""

    def __init__(self, script):
        super().__init__()
        self.script, self.reads = list(script), 0

    def get_job(self, name):
        self.reads += 1
        answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(answer, BaseException) or callable(answer):
            raise answer() if callable(answer) else answer
        return _job(name, answer)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def _wait(nodes, **settings):
    clock = Clock()
    trainjob.wait(nodes, "job1", _settings(nodes=2, poll_seconds=30, **settings), lambda *_: None, clock, clock.sleep)
    return clock


def test_transient_status_errors_are_retried_and_a_lost_job_is_deleted():
    flaky = ScriptedNodes(["Running", RuntimeError("connection reset"), RuntimeError("503"), "Running", "Complete"])
    _wait(flaky)
    assert flaky.reads == 5 and flaky.deleted == []

    lost = ScriptedNodes(["Running", RuntimeError("Unauthorized")])
    with pytest.raises(trainjob.TrainJobFailed, match="unreadable 5 times"):
        _wait(lost)
    assert lost.reads == 6 and lost.deleted == ["job1"]


def test_a_job_that_never_starts_or_never_ends_is_deleted_in_time():
    pending = ScriptedNodes(["Created"])
    with pytest.raises(trainjob.TrainJobFailed, match="did not start within 1800s"):
        _wait(pending, start_timeout_seconds=1800)
    assert pending.deleted == ["job1"] and pending.reads == 1800 // 30 + 2

    endless = ScriptedNodes(["Running"])
    with pytest.raises(trainjob.TrainJobFailed, match="still running after 7200s"):
        _wait(endless, timeout_seconds=7200)
    assert endless.deleted == ["job1"]


def test_the_step_being_stopped_deletes_its_job():
    """Kubernetes stops the step's pod with SIGTERM (step timeout, run terminated, node drained)."""
    import os
    import signal

    def stopped():
        os.kill(os.getpid(), signal.SIGTERM)
        return RuntimeError("not reached")

    nodes = ScriptedNodes(["Running", stopped, "Running"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(BaseException, match="signal 15"):
        _wait(nodes)
    assert nodes.deleted == ["job1"]
    assert signal.getsignal(signal.SIGTERM) is before


RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def test_the_job_pods_meet_the_restricted_pod_security_profile_and_get_shm_and_the_cache_volume():
    api = ClusterApi()
    trainjob.submit(cluster_client(api), _settings(nodes=2, cache_claim="moecl-cache"), {"run_id": "r"})
    [patch] = api.created[0]["body"]["spec"]["runtimePatches"]
    [replicated] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = replicated["template"]["spec"]["template"]["spec"]
    assert replicated["name"] == "node"
    assert RESTRICTED_POD.items() <= pod["securityContext"].items() and pod["securityContext"]["runAsUser"] != 0
    [container] = pod["containers"]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts[trainjob.CACHE_DIR]]["persistentVolumeClaim"]["claimName"] == "moecl-cache"
