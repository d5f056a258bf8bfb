from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(tracking_uri: str, model_name: str, run_id: str, version: str, evaluation: str,
            thresholds_json: str, deployed_thresholds_json: str) -> str:
    """The gate: move `champion` to the new version only if it passes; else tag the reasons. The
    deployed thresholds are fixed when the pipeline is compiled; the run's may only tighten them."""
    import json

    from moecl.mlops import steps

    decision = steps.promote(tracking_uri, model_name, run_id, version, json.loads(evaluation),
                             json.loads(deployed_thresholds_json), json.loads(thresholds_json))
    return json.dumps(decision)
