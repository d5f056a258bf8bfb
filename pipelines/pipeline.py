"""The DAG: validate -> train -> evaluate -> register -> promote. Wiring only; steps live in moecl."""

import json

from kfp import dsl, kubernetes

from components.evaluate import evaluate
from components.finalize import finalize
from components.promote import promote
from components.register import register
from components.train import train
from components.validate_data import validate_data
from moecl.mlops.trainjob import CACHE_DIR

PIPELINE_NAME = "moecl-continual-training"


def _on_gpu_pool(task: dsl.PipelineTask, gpu: dict) -> None:
    """Schedule a heavy step on the GPU node pool described in infra/cluster.yaml."""
    task.set_accelerator_type(gpu["accelerator_type"]).set_accelerator_limit(gpu["accelerator_limit"])
    task.set_cpu_request(str(gpu["cpu_request"])).set_memory_request(gpu["memory_request"])
    task.set_memory_limit(gpu["memory_limit"]).set_retry(num_retries=gpu["retries"])
    for label, value in gpu["node_selector"].items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for toleration in gpu["tolerations"]:
        kubernetes.add_toleration(task, **toleration)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=gpu["shm_size"])
    if gpu.get("cache_claim"):  # the steps that load a backbone read it from the cluster's one copy
        kubernetes.mount_pvc(task, pvc_name=gpu["cache_claim"], mount_path=CACHE_DIR)
    kubernetes.set_timeout(task, gpu["timeout_seconds"])


def _with_secrets(tasks: dict[str, dsl.PipelineTask], step_secrets: dict) -> None:
    """Give steps the Secrets they read as environment variables (`all`: every step)."""
    for step, task in tasks.items():
        for secret, keys in {**step_secrets.get("all", {}), **step_secrets.get(step, {})}.items():
            kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in keys})


def build(gpu: "dict | None" = None, train_job: "dict | None" = None, step_secrets: "dict | None" = None,
          deployed_rules: "dict | None" = None, deployed_gate: "dict | None" = None):
    """The pipeline function; with `gpu` settings, train and evaluate go to the GPU node pool. With a
    `train_job` of several nodes, training runs as a Kubeflow TrainJob and the train step only
    submits it and waits (so it needs no GPU itself); the TrainJob settings are compiled in, not a run
    parameter, so where train runs and how it trains cannot disagree. `step_secrets`: Secrets per step (cluster).
    `deployed_rules` / `deployed_gate`: the data rules and gate thresholds, compiled in as constants,
    so a run's `rules_json` / `thresholds_json` can only tighten them."""
    multi_node = (train_job or {}).get("nodes", 1) > 1
    train_job_compiled = json.dumps(train_job or {})
    rules, gate = json.dumps(deployed_rules or {}), json.dumps(deployed_gate or {})

    @dsl.pipeline(name=PIPELINE_NAME, description="Add each new task dataset version to the MoE-CL champion "
                  "without forgetting: validate, train, evaluate every task, register, gated promotion.")
    def continual_training(data_version: str, data_remote: str, tracking_uri: str, run_id: str,
                           parent_version: str = "", model_name: str = "moecl", settings_json: str = "{}",
                           rules_json: str = "{}", thresholds_json: str = "{}"):
        common = {"tracking_uri": tracking_uri, "model_name": model_name, "run_id": run_id}
        closing = finalize(tracking_uri=tracking_uri, run_id=run_id)
        closing.set_display_name("finalize").set_caching_options(False)
        with dsl.ExitHandler(closing, name="pipeline"):
            validated = validate_data(**common, parent_version=parent_version, data_remote=data_remote,
                                      data_version=data_version, rules_json=rules_json,
                                      deployed_rules_json=rules)
            validated.set_display_name("validate")
            trained = train(**common, parent_version=parent_version, settings_json=settings_json,
                            task_versions=validated.outputs["Output"], data_remote=data_remote, data_version=data_version,
                            train_job_json=train_job_compiled, dataset=validated.outputs["dataset"])
            evaluated = evaluate(**common, parent_version=parent_version, settings_json=settings_json,
                                 train_summary=trained.outputs["Output"], dataset=validated.outputs["dataset"],
                                 model=trained.outputs["model"])
            registered = register(**common, data_version=data_version, task_versions=validated.outputs["Output"],
                                  settings_json=settings_json, evaluation=evaluated.outputs["Output"],
                                  model=trained.outputs["model"])
            promoted = promote(**common, version=registered.output, evaluation=evaluated.outputs["Output"],
                               thresholds_json=thresholds_json, deployed_thresholds_json=gate)
            for step in (registered, promoted):  # registry side effects must happen on every run
                step.set_caching_options(False)
            if gpu:
                if not multi_node:
                    _on_gpu_pool(trained, gpu)
                _on_gpu_pool(evaluated, gpu)
            if step_secrets:
                _with_secrets({"validate-data": validated, "train": trained, "evaluate": evaluated,
                               "register": registered, "promote": promoted}, step_secrets)
        if step_secrets:
            _with_secrets({"finalize": closing}, step_secrets)

    return continual_training
