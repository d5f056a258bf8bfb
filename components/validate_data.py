from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_data(tracking_uri: str, model_name: str, parent_version: str, run_id: str, data_remote: str,
                  data_version: str, rules_json: str, deployed_rules_json: str, dataset: Output[Dataset]) -> str:
    """Fetch the data version from the DVC remote and validate every task with Great Expectations
    (the deployed rules, fixed when the pipeline is compiled, tightened by the run's)."""
    import json

    from moecl.mlops import steps

    dataset.metadata["data_version"] = data_version
    try:
        return steps.validate(tracking_uri, model_name, parent_version, run_id, data_remote, data_version,
                              json.loads(deployed_rules_json), dataset.path, json.loads(rules_json))
    except steps.ValidationFailed as err:  # a verdict on the data, not a crash: its lines, no traceback
        print(err)
        raise SystemExit(1) from None
