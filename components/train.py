from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(tracking_uri: str, model_name: str, parent_version: str, run_id: str, settings_json: str, task_versions: str,
          data_remote: str, data_version: str, train_job_json: str, dataset: Input[Dataset], model: Output[Model]) -> str:
    """Continue the registry's champion with the version's new and changed tasks: on every GPU of
    this pod, or as a multi-node Kubeflow TrainJob when `train_job_json` asks for several nodes."""
    import json

    from moecl.mlops import steps

    summary = steps.train(tracking_uri, model_name, parent_version, run_id, json.loads(settings_json),
                          dataset.path, task_versions, model.path, data_remote, data_version,
                          json.loads(train_job_json))
    model.metadata.update(summary)
    return json.dumps(summary)
