from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_data(tracking_uri: str, model_name: str, parent_version: str, run_id: str, data_remote: str,
                  data_version: str, rules_json: str, dataset: Output[Dataset]) -> str:
    """Fetch the data version from the DVC remote and validate every task with Great Expectations."""
    import json

    from moecl.mlops import steps

    dataset.metadata["data_version"] = data_version
    return steps.validate(tracking_uri, model_name, parent_version, run_id, data_remote, data_version,
                          json.loads(rules_json), dataset.path)
