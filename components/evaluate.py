from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(tracking_uri: str, model_name: str, parent_version: str, run_id: str, settings_json: str, train_summary: str,
             dataset: Input[Dataset], model: Input[Model], metrics: Output[Metrics]) -> str:
    """Accuracy on every task seen so far, for the candidate and the champion on the same test data."""
    import json
    import os

    from moecl.mlops import steps

    evaluation = steps.evaluate(tracking_uri, model_name, parent_version, run_id, json.loads(settings_json), dataset.path,
                                model.path, json.loads(train_summary),
                                os.path.join(os.path.dirname(metrics.path), "evaluation.json"))
    for task, value in evaluation["candidate"].items():
        metrics.log_metric(f"accuracy.{task}", value)
    metrics.log_metric("aa", evaluation["candidate_aa"])
    if evaluation["bwt"] is not None:
        metrics.log_metric("bwt", evaluation["bwt"])
    return json.dumps(evaluation)
