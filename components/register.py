from kfp import dsl
from kfp.dsl import Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(tracking_uri: str, model_name: str, run_id: str, data_version: str, task_versions: str,
             settings_json: str, evaluation: str, model: Input[Model]) -> str:
    """Register the candidate in MLflow as a pyfunc version tagged with its lineage and metrics."""
    import json

    from moecl.methods import DEFAULT
    from moecl.mlops import steps

    method = json.loads(settings_json).get("method", DEFAULT)
    return steps.register(tracking_uri, model_name, run_id, model.path, json.loads(evaluation),
                          data_version, task_versions, method)
