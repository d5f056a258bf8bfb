"""The whole pipeline, embedded (kfp.local + sqlite MLflow + local DVC remote), on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from moecl.mlops import registry, steps
from moecl.mlops.trigger import trigger
from moecl.mlops.versioning import init_project, snapshot
from pipelines.__main__ import main
from pipelines.launcher import PipelineSettings, Workdir, run_embedded
from tests.conftest import write_task

TINY_TRAINING = {
    "backbone": "tiny-random-llama", "method": "moecl",
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    # The tiny model trains at lr 0.02: a stronger adversary diverges. 0.005 per layer over its 2 layers
    # and the joint step alone is the strength this test was written with (0.01 averaged over layers).
    "adversarial": {"weight": 0.005, "inner_steps": 1},
    "train": {"epochs": 6, "batch_size": 4, "lr": 0.02, "max_length": 64, "seed": 0, "max_grad_norm": 1.0,
              "precision": "fp32"},  # the same arithmetic on every CI CPU (auto resolves per machine)
    "eval": {"batch_size": 8},
}
RULES = {"min_rows_per_label_train": 4, "min_rows_per_label_test": 2}
LENIENT_GATE = {"min_new_task_accuracy": 0.0, "max_old_task_drop": 1.0, "max_aa_drop": 1.0, "min_eval_examples": 0,
                "max_chance_p": 1.0}


@pytest.fixture
def project(tmp_path):
    root = init_project(tmp_path / "project", tmp_path / "dvc-remote")
    write_task(root / "data" / "topics", ["sports", "science", "politics"])
    write_task(root / "data" / "sentiment", ["bad", "good"], salt="review ")
    return root


def _launcher(tmp_path, base: dict = TINY_TRAINING, **overrides):
    """(tracking URI, trigger bound to an embedded launcher with these settings: `base` training
    settings, updated by overrides["training"])."""
    settings = PipelineSettings(model_name="moecl", training={**base, **overrides.pop("training", {})},
                                validation=RULES, gate={**LENIENT_GATE, **overrides.pop("gate", {})})
    workdir = Workdir(tmp_path / "work")

    def run(project, **kwargs):
        return trigger(project, workdir.tracking_uri, lambda version, run_id: run_embedded(version, settings, workdir, run_id),
                       artifact_root=str(workdir.artifacts), **kwargs)
    return workdir.tracking_uri, run


def _assert_reused_answers_equal_fresh_ones(tmp_path, tracking_uri, run_id, project):
    """The evaluate step reused the champion's recorded answers for the tasks whose tensors and test
    data are unchanged (the old tasks, for candidate and champion alike) and the train step's own
    answers for the task it trained: they equal a fresh scoring."""
    import mlflow

    from moecl.mlops.versioning import current_version, materialize

    evaluation = mlflow.artifacts.load_dict(f"{MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri}"
                                            "/evaluation/evaluation.json")
    reused = {side: sorted(tasks) for side, tasks in evaluation["reused"].items()}
    assert reused == {"candidate": ["animals", "sentiment", "topics"], "champion": ["sentiment", "topics"]}
    dataset = materialize(current_version(project), tmp_path / "fetched")
    cfg = steps.run_config(TINY_TRAINING, dataset, ["topics", "sentiment", "animals"])
    for model, side in (("2", "candidate"), ("1", "champion")):
        checkpoint = registry.fetch(tracking_uri, "moecl", model, tmp_path / f"model-{model}").checkpoint
        tasks = ["topics", "sentiment", "animals"][: 3 if side == "candidate" else 2]
        fresh = steps._answers(lambda: checkpoint, dataset, tasks, cfg)
        assert {t: a["correct"] for t, a in fresh.items()} == evaluation[f"{side}_correct"], side
        assert not any(a["reused"] for a in fresh.values())



def test_recorded_answers_are_reused_only_under_the_code_that_scored_them(tmp_path, monkeypatch):
    """The answers a training run scored (kept with its checkpoint) and a champion's recorded answers
    stand while the test data, settings and answering code are unchanged; after a change to that code
    (prompt rendering, forward, scoring) the model is loaded and scored again."""
    from moecl import answer_keys
    from moecl.trainer import Trainer

    dataset = tmp_path / "data"
    write_task(dataset / "topics", ["sports", "science", "politics"])
    cfg = steps.run_config({**TINY_TRAINING, "train": {**TINY_TRAINING["train"], "epochs": 1}}, dataset, ["topics"])
    Trainer(cfg, tmp_path / "run").run()
    loads = []

    def checkpoint():
        loads.append(1)
        return tmp_path / "run" / "checkpoint"

    fresh = steps._answers(checkpoint, dataset, ["topics"], cfg)
    assert not fresh["topics"]["reused"] and len(loads) == 1
    in_training = json.loads((checkpoint() / answer_keys.ANSWERS_FILE).read_text())
    reused = steps._answers(checkpoint, dataset, ["topics"], cfg, known=in_training)
    assert reused["topics"]["reused"] and reused["topics"]["correct"] == fresh["topics"]["correct"]
    assert reused["topics"]["margins"] == fresh["topics"]["margins"]
    loads.clear()
    champion = steps._answers(checkpoint, dataset, ["topics"], cfg, known=fresh, known_model=True)
    assert champion["topics"]["reused"] and not loads  # not even loaded
    monkeypatch.setattr(answer_keys, "answering_code_digest", lambda: "another version of the code")
    rescored = steps._answers(checkpoint, dataset, ["topics"], cfg, known=fresh, known_model=True)
    assert not rescored["topics"]["reused"] and len(loads) == 1
    assert rescored["topics"]["correct"] == fresh["topics"]["correct"]
    assert rescored["topics"]["data"] != fresh["topics"]["data"]


def test_the_answering_code_digest_changes_with_the_source_of_any_answering_module(tmp_path, monkeypatch):
    import shutil

    from moecl import answer_keys

    copy = tmp_path / "moecl"
    copy.mkdir()
    for name in answer_keys.ANSWERING_MODULES:
        shutil.copy(Path(answer_keys.__file__).parent / f"{name}.py", copy)
    monkeypatch.setattr(answer_keys, "__file__", str(copy / "answer_keys.py"))
    digests = set()
    for name in (None, *answer_keys.ANSWERING_MODULES):
        if name:
            (copy / f"{name}.py").write_text((copy / f"{name}.py").read_text() + "\n# changed\n")
        answer_keys.answering_code_digest.cache_clear()
        digests.add(answer_keys.answering_code_digest())
    answer_keys.answering_code_digest.cache_clear()
    assert len(digests) == 1 + len(answer_keys.ANSWERING_MODULES)

def _versions(tracking_uri):
    return sorted(int(v.version) for v in MlflowClient(tracking_uri).search_model_versions("name='moecl'"))


def _runs(tracking_uri):
    return MlflowClient(tracking_uri).search_runs([registry.experiment_id(tracking_uri)])


def test_new_data_versions_flow_through_to_champion(tmp_path, project, capfd):
    tracking_uri, launch = _launcher(tmp_path)
    snapshot(project)
    assert launch(project)
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == "1"

    write_task(project / "data" / "animals", ["cat", "dog", "bird", "fish"], salt="pet ")
    snapshot(project)
    second_run = launch(project)
    assert second_run and len(_runs(tracking_uri)) == 2
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == "2"
    assert registry.alias_version(tracking_uri, "moecl", registry.PREVIOUS) == "1"
    run = MlflowClient(tracking_uri).get_run(second_run)
    for task in ("topics", "sentiment", "animals"):
        assert f"forgetting.{task}" in run.data.metrics and f"accuracy.{task}" in run.data.metrics
    for task in ("topics", "sentiment"):
        assert f"champion_accuracy.{task}" in run.data.metrics
    assert all(0.0 <= run.data.metrics[f"automation.{t}"] <= 1.0 for t in ("topics", "sentiment", "animals"))
    version = MlflowClient(tracking_uri).get_model_version("moecl", "2")
    assert version.tags["parent_champion_version"] == "1" and version.tags["method"] == "moecl"
    _assert_reused_answers_equal_fresh_ones(tmp_path, tracking_uri, second_run, project)
    # What a data scientist reviews: every setting, per-step curves, the data version, a model card.
    params = run.data.params
    assert len(params) >= 10 and params["train.lr"] == "0.02" and params["lora.r"] == "4"
    assert params["gate.max_old_task_drop"] == "1.0" and params["adversarial.weight"] == "0.005"
    losses = MlflowClient(tracking_uri).get_metric_history(second_run, "train.loss")
    assert len(losses) == 6 * 6 and {"train.disc_loss", "train.disc_acc", "train.lr"} <= set(run.data.metrics)
    [dataset] = run.inputs.dataset_inputs
    assert json.loads(dataset.dataset.profile)["num_rows"] == 3  # one row per task: its version and sizes
    assert {t.key: t.value for t in dataset.tags}["dvc_version"] == run.data.tags[registry.TAG_DATA_VERSION]
    assert "moecl version 2" in version.description and "Gate: promoted" in version.description
    assert run.data.tags["mlflow.note.content"] == version.description
    assert set(json.loads(version.tags["task_versions"])) == {"topics", "sentiment", "animals"}

    assert launch(project) is None  # no new data: no run
    assert len(_runs(tracking_uri)) == 2

    bad = project / "data" / "animals" / "train.jsonl"
    bad.write_text(bad.read_text() + json.dumps({"text": "a hamster hamster", "label": "hamster"}) + "\n")
    snapshot(project)
    with pytest.raises(steps.Refused) as refusal:
        launch(project)
    assert any("animals/train.jsonl" in line and "label_in_labels_json" in line for line in refusal.value.violations)
    failed = [r for r in _runs(tracking_uri) if r.data.tags.get(registry.TAG_OUTCOME) == "validation_failed"]
    assert len(failed) == 1
    errors = failed[0].data.tags["moecl.validation_errors"]
    assert "animals/train.jsonl" in errors and "label_in_labels_json" in errors
    assert _versions(tracking_uri) == [1, 2]
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == "2"

    model = registry.fetch(tracking_uri, "moecl", "2", tmp_path / "served")
    assert model is not None  # the registered pyfunc answers {task, text} -> label
    import mlflow.pyfunc
    import pandas as pd

    served = mlflow.pyfunc.load_model("models:/moecl@champion")
    answers = served.predict(pd.DataFrame({"task": ["animals", "topics"], "text": ["dog dog dog", "sports sports"]}))
    assert answers[0] in {"cat", "dog", "bird", "fish"} and answers[1] in {"sports", "science", "politics"}
    untold = served.predict(pd.DataFrame({"text": ["pet train 1 golf: cat cat cat cat cat cat"]}))  # no task column
    assert untold[0] in {"cat", "dog", "bird", "fish"}


def _launch_two_versions(project, launch) -> None:
    """v1: the project's two tasks; v2: animals added."""
    snapshot(project)
    launch(project)
    write_task(project / "data" / "animals", ["cat", "dog", "bird", "fish"], salt="pet ")
    snapshot(project)
    launch(project)


def test_gate_rejects_a_forgetting_candidate_and_rollback_restores(tmp_path, project):
    # With the default shared-expert snapshots a new task cannot reach the old ones at all; the live
    # shared expert (the paper's design) can, which is what this gate test needs.
    # No adversary here: this test is about the gate, and the tiny model's live shared expert keeps
    # its old tasks only while nothing but the task loss moves it.
    live = {**TINY_TRAINING, "retention": {"shared": "live"}, "adversarial": {"weight": 0.0}}
    tracking_uri, launch = _launcher(tmp_path, training=live)
    _launch_two_versions(project, launch)
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == "2"

    # A deliberately harmful run: a huge learning rate wrecks the live shared expert every task reads.
    _, harmful = _launcher(tmp_path, training={**live, "train": {**TINY_TRAINING["train"], "lr": 50.0}},
                           gate={"max_old_task_drop": 0.0, "significance": 1.0})  # 3 test rows a task: any fall
    write_task(project / "data" / "colors", ["red", "blue"], salt="paint ")
    snapshot(project)
    harmful(project)
    client = MlflowClient(tracking_uri)
    rejected = client.get_model_version("moecl", "3")
    assert rejected.tags["moecl.promotion"] == "rejected"
    assert "accuracy fell" in rejected.tags["moecl.rejection_reasons"]
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == "2"
    assert registry.alias_version(tracking_uri, "moecl", registry.PREVIOUS) == "1"

    assert main(["rollback", "--workdir", str(tmp_path / "work"), "--reason", "v2 misroutes"]) == 0
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == "1"
    assert registry.alias_version(tracking_uri, "moecl", registry.PREVIOUS) is None
    assert client.get_model_version("moecl", "2").tags["moecl.rolled_back"] == "true"
    moves = json.loads(client.get_registered_model("moecl").tags["moecl.alias_log"])
    assert [m["version"] for m in moves] == ["1", "2", "1"]  # who moved champion, and why, every time
    assert moves[0]["by"].startswith("pipeline run ") and "v2 misroutes" in moves[-1]["why"]
    assert main(["rollback", "--workdir", str(tmp_path / "work")]) == 2  # nothing left to roll back to


def test_the_default_method_runs_the_pipeline_and_never_moves_a_task_it_does_not_retrain(tmp_path, project):
    """The shipped default (settings without `method`): every version is trained, registered and tagged
    with it; a task whose data did not change keeps its adapter to the bit, a task whose data changed
    is retrained."""
    from safetensors.torch import load_file

    from moecl.methods import DEFAULT

    default = {key: value for key, value in TINY_TRAINING.items() if key not in ("method", "adversarial")}
    tracking_uri, launch = _launcher(tmp_path, base=default)
    _launch_two_versions(project, launch)
    write_task(project / "data" / "topics", ["sports", "science", "politics"], per_label=(7, 3))  # one more row a label
    snapshot(project)
    launch(project)
    client = MlflowClient(tracking_uri)
    assert [client.get_model_version("moecl", v).tags["method"] for v in "123"] == [DEFAULT] * 3
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == "3"

    def expert(version: str, task: str) -> dict:
        checkpoint = registry.fetch(tracking_uri, "moecl", version, tmp_path / f"model-{version}").checkpoint
        return load_file(checkpoint / "adapters" / f"expert-{task}.safetensors")

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    assert same(expert("1", "sentiment"), expert("3", "sentiment"))  # trained in v1 only
    assert same(expert("2", "animals"), expert("3", "animals"))
    assert not same(expert("2", "topics"), expert("3", "topics"))  # its data changed in v3
