"""The compiled pipeline YAML: current, parseable, GPU settings on train/evaluate, and every step
running in the image infra/Dockerfile builds with the command that image provides."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kfp
import yaml

from pipelines.__main__ import COMPILED, compile_pipeline

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text())


def _compiled(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    return fresh, list(yaml.safe_load_all(fresh.read_text()))


def test_checked_in_yaml_is_the_current_compile(tmp_path):
    fresh, _ = _compiled(tmp_path)
    assert COMPILED.read_text() == fresh.read_text(), "run `python -m pipelines compile` and commit the YAML"


def _steps(spec) -> dict:
    """The pipeline's steps: inside the exit handler, whose `finalize` closes the run however it ends."""
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finalize"}
    assert root["finalize"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["finalize"]["dependentTasks"] == ["exit-handler-1"]
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def test_dag_order_and_parameters(tmp_path):
    _, (spec, _) = _compiled(tmp_path)
    tasks = _steps(spec)
    assert set(tasks) == {"validate-data", "train", "evaluate", "register", "promote"}
    assert tasks["train"]["dependentTasks"] == ["validate-data"]
    assert set(tasks["evaluate"]["dependentTasks"]) == {"train", "validate-data"}
    assert "evaluate" in tasks["register"]["dependentTasks"] and "register" in tasks["promote"]["dependentTasks"]
    assert {"data_version", "data_remote", "parent_version", "run_id"} <= set(spec["root"]["inputDefinitions"]["parameters"])
    for step in ("register", "promote"):
        assert tasks[step]["cachingOptions"] == {}  # side effects: never served from cache


def test_the_deployed_gate_and_data_rules_are_compiled_in_not_run_parameters(tmp_path):
    """Whoever creates a run sets its parameters: the gate and the rules it can pass only tighten
    the deployed ones, which are constants of the compiled pipeline."""
    import json

    from pipelines.launcher import PRODUCTION_SETTINGS, PipelineSettings

    _, (spec, _) = _compiled(tmp_path)
    production = PipelineSettings.from_configmap(PRODUCTION_SETTINGS)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert not {"deployed_thresholds_json", "deployed_rules_json"} & set(parameters)
    tasks = _steps(spec)
    for step, name, deployed in (("promote", "deployed_thresholds_json", production.gate),
                                 ("validate-data", "deployed_rules_json", production.validation)):
        value = tasks[step]["inputs"]["parameters"][name]["runtimeValue"]["constant"]
        assert json.loads(value) == deployed and deployed, step


def test_train_and_evaluate_go_to_the_gpu_pool(tmp_path):
    from moecl.mlops.trainjob import CACHE_DIR
    from pipelines.launcher import cluster_settings

    _, (spec, platform) = _compiled(tmp_path)
    gpu, _, _ = cluster_settings()
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("train", "evaluate"):
        resources = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == gpu["accelerator_type"]
        assert resources["accelerator"]["resourceCount"] == str(gpu["accelerator_limit"])
        assert resources["resourceMemoryLimit"] == gpu["memory_limit"]
        assert _steps(spec)[step]["retryPolicy"]["maxRetryCount"] == gpu["retries"]
        settings = k8s[f"exec-{step}"]
        assert settings["nodeSelector"]["labels"] == gpu["node_selector"]
        assert settings["tolerations"] == gpu["tolerations"]
        assert settings["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        assert settings["emptyDirMounts"][0]["sizeLimit"] == gpu["shm_size"]
        assert settings["activeDeadlineSeconds"] == str(gpu["timeout_seconds"])
        [cache] = settings["pvcMount"]  # the backbone comes from the cluster's one copy
        assert cache["mountPath"] == CACHE_DIR and cache["constant"] == gpu["cache_claim"] == CLUSTER["cache_claim"]
    for step in ("validate-data", "register", "promote"):
        assert "accelerator" not in spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"].get("resources", {})


def test_every_step_runs_in_the_dockerfile_image(tmp_path):
    _, (spec, _) = _compiled(tmp_path)
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    # The image installs pyproject's dependencies, so the executor below comes from this kfp; and moecl itself.
    assert f"kfp=={kfp.__version__}" in (ROOT / "pyproject.toml").read_text()
    assert re.search(r"pip install --no-cache-dir --no-deps /opt/moecl\b", dockerfile)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == CLUSTER["image"], name
        assert "python3 -m kfp.dsl.executor_main" in container["command"][2], name
        assert "pip install" not in " ".join(container["command"]), name  # nothing installed at run time
        assert "from moecl.mlops import steps" in container["command"][-1], name


def test_steps_that_need_no_model_start_without_torch_or_great_expectations():
    """Every step is a process of its own: register, promote and finalize must not pay for importing
    torch, transformers or Great Expectations (about 20 s per step on a small node)."""
    heavy = ("torch", "transformers", "great_expectations")
    probe = ("import sys; import components.register, components.promote, components.finalize;"
             "from moecl.mlops import steps; print(sorted(m for m in %r if m in sys.modules))" % (heavy,))
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_a_submitted_run_is_sized_and_gated_by_the_settings_it_runs_with(tmp_path):
    """The trigger passes the mounted production ConfigMap (--settings): the GPU steps' memory and
    the compiled-in gate come from it, not from the copy inside the image."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from moecl.mlops.versioning import DataVersion
    from pipelines.launcher import PipelineSettings, production_settings, step_memory, submit

    production = production_settings()
    mounted = PipelineSettings(production.model_name, {**production.training, "train": {
        **production.training.get("train", {}), "precision": "fp32"}}, production.validation,
        {**production.gate, "min_new_task_accuracy": 0.61})
    submitted = tmp_path / "submitted.yaml"

    class Cluster:
        def create_run_from_pipeline_func(self, func, arguments, run_name, experiment_name):
            from kfp import compiler

            compiler.Compiler().compile(func, str(submitted))
            return SimpleNamespace(run_id="kfp-1")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("moecl")).info.run_id
    submit(DataVersion("a" * 32, "s3://b/dvc"), mounted, "http://kfp", uri, run_id, client=Cluster())

    spec = next(yaml.safe_load_all(submitted.read_text()))
    limit = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["resourceMemoryLimit"]
    assert limit == step_memory(float(CLUSTER["gpu"]["backbone_parameters"]), "fp32")["memory_limit"]
    assert production.training["train"]["precision"] != "fp32"  # so the image's copy would size it otherwise
    promote = _steps(spec)["promote"]["inputs"]["parameters"]
    assert '"min_new_task_accuracy": 0.61' in promote["deployed_thresholds_json"]["runtimeValue"]["constant"]
