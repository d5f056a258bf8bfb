from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finalize(tracking_uri: str, run_id: str) -> str:
    """Exit handler: a run that ended without an outcome is marked failed, so it is retried."""
    from moecl.mlops import steps

    return steps.finalize(tracking_uri, run_id)
