"""The embedded pipeline with every KFP step inside the project's image, as a cluster runs them."""

import json

import pytest
from kfp import dsl, local
from mlflow import MlflowClient

from components import IMAGE
from moecl.mlops import registry
from moecl.mlops.trigger import trigger
from moecl.mlops.versioning import init_project, snapshot
from pipelines.containers import StepContainers
from pipelines.launcher import PipelineSettings, Workdir, run_embedded
from tests.conftest import write_task
from tests.containers.conftest import IMAGE as TEST_IMAGE
from tests.test_pipeline import LENIENT_GATE, RULES, TINY_TRAINING


def _launch(tmp_path, containers, training=None):
    settings = PipelineSettings(model_name="moecl", training={**TINY_TRAINING, **(training or {})},
                                validation=RULES, gate=LENIENT_GATE)
    workdir = Workdir(tmp_path / "work")

    def run(project):
        return trigger(project, workdir.tracking_uri,
                       lambda version, run_id: run_embedded(version, settings, workdir, run_id, containers=containers),
                       artifact_root=str(workdir.artifacts))
    return workdir.tracking_uri, run


def test_a_champion_then_a_gated_second_version_with_every_step_in_the_image(tmp_path, engine):
    assert IMAGE == TEST_IMAGE  # the components name the image under test
    project = init_project(tmp_path / "project", tmp_path / "dvc-remote")
    write_task(project / "data" / "topics", ["sports", "science", "politics"])
    containers = StepContainers(cache=tmp_path / "backbones")
    tracking_uri, launch = _launch(tmp_path, containers)

    snapshot(project)
    assert launch(project)
    write_task(project / "data" / "sentiment", ["bad", "good"], salt="review ")
    snapshot(project)
    second = launch(project)
    assert second

    steps = [c.step for c in containers.ran]
    assert len(containers.ran) >= 12, steps  # validate, train, evaluate, register, promote, finalize; twice
    assert {c.image for c in containers.ran} == {TEST_IMAGE}
    assert all(c.exit_code == 0 for c in containers.ran), containers.ran
    assert {"validate_data", "train", "evaluate", "register", "promote", "finalize"} <= set(steps)
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == "2"
    champion = MlflowClient(tracking_uri).get_model_version("moecl", "2")
    assert champion.run_id == second
    assert set(json.loads(champion.tags["accuracy"])) == {"topics", "sentiment"}
    assert (tmp_path / "backbones").is_dir() and any((tmp_path / "backbones").iterdir())  # one cache, shared


def test_a_step_failing_inside_its_container_fails_the_run(tmp_path, engine):
    project = init_project(tmp_path / "project", tmp_path / "dvc-remote")
    write_task(project / "data" / "topics", ["sports", "science", "politics"])
    containers = StepContainers(cache=tmp_path / "backbones")
    # A backbone no step can load: the train step's container fails within seconds.
    tracking_uri, launch = _launch(tmp_path, containers, training={"backbone": str(tmp_path / "no-such-backbone")})
    snapshot(project)
    with pytest.raises(RuntimeError):
        launch(project)

    assert [c.step for c in containers.ran][:2] == ["validate_data", "train"]
    assert containers.ran[1].exit_code != 0
    run = MlflowClient(tracking_uri).search_runs([registry.experiment_id(tracking_uri)])[0]
    assert run.info.status == "FAILED"
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) is None


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def exits_at_once(code: int):
    raise SystemExit(code)


@dsl.pipeline
def one_failing_step(code: int):
    exits_at_once(code=code)


def test_a_step_that_fails_fast_is_not_read_as_success(tmp_path, engine):
    """kfp's own DockerRunner reads the auto-removed container of this step as exit code 0."""
    containers = StepContainers(cache=tmp_path / "backbones")
    local.init(runner=containers.runner(), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    with containers.active(tmp_path / "home", []), pytest.raises(RuntimeError):
        one_failing_step(code=7)
    assert [(c.step, c.exit_code) for c in containers.ran] == [("exits_at_once", 7)]
