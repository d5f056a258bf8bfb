"""Scheduled retraining: a version runs once at a time, a lost run is relaunched after its lease, a
failed one is retried with backoff up to a limit, and the champion only moves by compare-and-set.
The concurrency and kill tests use real processes of the real command on a real sqlite store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from moecl.mlops import lifecycle, registry, steps
from moecl.mlops.lifecycle import Policy

from .test_scheduling import _project, _settings

ROOT = Path(__file__).resolve().parents[1]


def _command(tmp_path, project, *extra) -> list[str]:
    return [sys.executable, "-m", "pipelines", "trigger", "--project", str(project), "--workdir", str(tmp_path / "work"),
            "--settings", str(_settings(tmp_path)), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _runs(tracking_uri) -> list:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(registry.EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_concurrent_triggers_for_one_version_make_exactly_one_run(tmp_path):
    project = _project(tmp_path)
    logs = [(tmp_path / f"trigger{i}.out", tmp_path / f"trigger{i}.err") for i in range(3)]
    triggers = [subprocess.Popen(_command(tmp_path, project), cwd=ROOT, env=_env(), stdout=out.open("w"),
                                 stderr=err.open("w")) for out, err in logs]
    codes = [t.wait(timeout=600) for t in triggers]
    results = [(code, out.read_text(), err.read_text()) for code, (out, err) in zip(codes, logs)]
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    launched = [out for _, out, _ in results if "pipeline run launched" in out]
    assert len(launched) == 1, [out for _, out, _ in results]
    tracking_uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    [run] = _runs(tracking_uri)
    assert run.data.tags[registry.TAG_OUTCOME] == "promoted" and run.info.status == "FINISHED"
    assert [str(v.version) for v in MlflowClient(tracking_uri).search_model_versions("name='moecl'")] == ["1"]


def test_a_killed_trigger_is_relaunched_after_its_lease_and_the_dead_run_is_failed(tmp_path):
    project = _project(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    doomed = subprocess.Popen(_command(tmp_path, project), cwd=ROOT, env=_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "work" / "mlflow.db").is_file():
        time.sleep(0.5)
    registry.init_store(tracking_uri)  # waits while the trigger creates the store's schema
    while time.time() < deadline and not _runs(tracking_uri):
        time.sleep(0.5)
    time.sleep(4)  # the run is under way: its first step is working
    os.killpg(doomed.pid, signal.SIGKILL)  # the trigger and every step it started, no handler runs
    doomed.wait()
    [dead] = _runs(tracking_uri)
    assert dead.info.status == "RUNNING"  # nothing could mark it: only its silence tells

    early = subprocess.run(_command(tmp_path, project), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert "nothing to launch" in early.stdout  # its lease (900 s by default) still holds

    time.sleep(2)
    again = subprocess.run(_command(tmp_path, project, "--lease-seconds", "1", "--backoff-seconds", "0"), cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "pipeline run launched" in again.stdout, again.stderr[-2000:]
    runs = {r.info.run_id: r for r in _runs(tracking_uri)}
    assert runs[dead.info.run_id].info.status == "FAILED"
    assert runs[dead.info.run_id].data.tags[registry.TAG_OUTCOME] == "lease_expired"
    [done] = [r for r in runs.values() if r.info.run_id != dead.info.run_id]
    assert done.data.tags[registry.TAG_OUTCOME] == "promoted" and done.data.tags[lifecycle.TAG_ATTEMPT] == "2"


def _fail(tracking_uri, version, policy, outcome="failed"):
    run_id, _ = lifecycle.claim(tracking_uri, version, policy)
    assert run_id, "the version was not due"
    steps.fail_run(tracking_uri, run_id, outcome)
    return run_id


def test_failed_runs_are_retried_with_backoff_up_to_a_limit_then_only_on_request(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = "a" * 32
    now_policy = Policy(lease_seconds=900, max_attempts=3, backoff_seconds=0)
    _fail(tracking_uri, version, now_policy, "interrupted")  # Ctrl-C does not make a version processed
    state = lifecycle.version_state(tracking_uri, version, Policy(backoff_seconds=3600))
    assert (state.state, state.attempts, state.due) == ("retrying", 1, False) and "interrupted" in state.detail
    assert lifecycle.claim(tracking_uri, version, Policy(backoff_seconds=3600))[0] is None  # backoff holds
    assert lifecycle.version_state(tracking_uri, version, now_policy).due
    _fail(tracking_uri, version, now_policy)
    _fail(tracking_uri, version, now_policy)
    state = lifecycle.version_state(tracking_uri, version, now_policy)
    assert (state.state, state.attempts, state.due) == ("failed", 3, False) and "--rerun" in state.detail
    assert lifecycle.claim(tracking_uri, version, now_policy)[0] is None
    rerun, _ = lifecycle.claim(tracking_uri, version, now_policy, rerun=True)
    assert rerun and MlflowClient(tracking_uri).get_run(rerun).data.tags["moecl.rerun"] == "true"
    steps._end_run(tracking_uri, rerun, "promoted")
    assert lifecycle.version_state(tracking_uri, version, now_policy).state == "processed"
    assert len(_runs(tracking_uri)) == 4  # no claim left a run behind


def test_a_stale_candidate_cannot_move_the_champion(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text("{}")
    versions = []
    for _ in range(3):
        run_id, _ = lifecycle.claim(tracking_uri, f"{len(versions)}" * 32, Policy(), str(tmp_path / "artifacts"))
        versions.append(registry.register(tracking_uri, "moecl", run_id, checkpoint, {}))
        assert registry.register(tracking_uri, "moecl", run_id, checkpoint, {}) == versions[-1]  # a retry: same version
    assert registry.promote(tracking_uri, "moecl", versions[0], None, "run a", "first") is None
    assert registry.promote(tracking_uri, "moecl", versions[1], versions[0], "run b", "passed") == versions[0]
    with pytest.raises(registry.StaleChampion, match=f"champion is version {versions[1]}, not version {versions[0]}"):
        registry.promote(tracking_uri, "moecl", versions[2], versions[0], "run c", "passed")  # trained from v1
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == versions[1]
    assert len(MlflowClient(tracking_uri).search_model_versions("name='moecl'")) == 3  # one per run, retries included

    evaluation = {"candidate_correct": {"t": [True] * 45 + [False] * 5}, "champion_correct": {"t": [True] * 40 + [False] * 10},
                  "candidate": {"t": 0.9}, "champion": {"t": 0.8}, "candidate_aa": 0.9, "champion_aa": 0.8,
                  "trained_tasks": ["t"], "parent_champion": versions[0]}
    run_id, _ = lifecycle.claim(tracking_uri, "9" * 32, Policy())
    decision = steps.promote(tracking_uri, "moecl", run_id, versions[2], evaluation, {})
    assert not decision["passed"] and "champion is version" in decision["reasons"][0]
    assert MlflowClient(tracking_uri).get_run(run_id).data.tags[registry.TAG_OUTCOME] == lifecycle.STALE
    state = lifecycle.version_state(tracking_uri, "9" * 32, Policy())
    assert (state.state, state.due, state.attempts) == (lifecycle.STALE, True, 0)  # trained again, not a failure
    log = json.loads(MlflowClient(tracking_uri).get_registered_model("moecl").tags["moecl.alias_log"])
    assert [(m["version"], m["by"]) for m in log] == [(versions[0], "run a"), (versions[1], "run b")]


def test_status_shows_versions_and_a_missing_registry_is_an_error(tmp_path, capsys):
    from pipelines.__main__ import main

    assert main(["status", "--workdir", str(tmp_path / "nowhere")]) == 2
    assert "no registry here" in capsys.readouterr().err
    assert not (tmp_path / "nowhere" / "mlflow.db").exists()  # nothing was created
    tracking_uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    _fail(tracking_uri, "b" * 32, Policy(backoff_seconds=0))
    assert main(["status", "--workdir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert "bbbbbbbbbbbb" in out and "retrying" in out and "champion = version None" in out


def test_after_a_rollback_a_run_on_older_data_cannot_become_champion(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text("{}")
    claimed = {}
    for name in ("d1", "d2", "d3"):  # three data versions, claimed in this order
        run_id, _ = lifecycle.claim(tracking_uri, name * 16, Policy(), str(tmp_path / "artifacts"))
        claimed[name] = (run_id, int(MlflowClient(tracking_uri).get_run(run_id).data.tags[registry.TAG_DATA_SEQ]))
    assert claimed["d1"][1] < claimed["d2"][1] < claimed["d3"][1]
    assert lifecycle.data_seq(tracking_uri, "d1" * 16) == claimed["d1"][1]
    v1 = registry.register(tracking_uri, "moecl", claimed["d1"][0], checkpoint, {})
    v2 = registry.register(tracking_uri, "moecl", claimed["d2"][0], checkpoint, {})
    registry.promote(tracking_uri, "moecl", v1, None, "run d1", "first", claimed["d1"][1])
    registry.promote(tracking_uri, "moecl", v2, v1, "run d2", "passed", claimed["d2"][1])
    for name in ("d1", "d2"):
        steps._end_run(tracking_uri, claimed[name][0], "promoted")
    registry.rollback(tracking_uri, "moecl", reason="v2 misbehaves")
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == v1
    # A late run of d1's data, trained from v1: the parent check alone would let it in.
    late, _ = lifecycle.claim(tracking_uri, "d1" * 16, Policy(), rerun=True)
    v_late = registry.register(tracking_uri, "moecl", late, checkpoint, {})
    with pytest.raises(registry.Superseded, match="newer data"):
        registry.promote(tracking_uri, "moecl", v_late, v1, "late run", "passed", claimed["d1"][1])
    evaluation = {"candidate_correct": {"t": [True] * 50}, "champion_correct": None, "candidate": {"t": 1.0},
                  "candidate_aa": 1.0, "trained_tasks": ["t"], "parent_champion": v1}
    decision = steps.promote(tracking_uri, "moecl", late, v_late, evaluation, {})
    assert not decision["passed"] and "newer data" in decision["reasons"][0]
    assert MlflowClient(tracking_uri).get_run(late).data.tags[registry.TAG_OUTCOME] == "superseded"
    assert lifecycle.version_state(tracking_uri, "d1" * 16, Policy()).state == "processed"  # final
    v3 = registry.register(tracking_uri, "moecl", claimed["d3"][0], checkpoint, {})
    registry.promote(tracking_uri, "moecl", v3, v1, "run d3", "passed", claimed["d3"][1])  # newer data: fine
    assert registry.alias_version(tracking_uri, "moecl", registry.CHAMPION) == v3


class _Cluster:
    """Kubeflow Pipelines as the lifecycle sees it: which runs wait to start; what was cancelled."""

    def __init__(self, waiting):
        self.waiting_runs, self.cancelled = set(waiting), []

    def waiting(self, kfp_run_id):
        return kfp_run_id in self.waiting_runs

    def cancel(self, kfp_run_id):
        self.cancelled.append(kfp_run_id)


def test_a_queued_cluster_run_keeps_its_lease_and_a_silent_one_is_failed_and_cancelled(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    queued, _ = lifecycle.claim(tracking_uri, "q" * 32, Policy())
    lost, _ = lifecycle.claim(tracking_uri, "l" * 32, Policy())
    client.set_tag(queued, lifecycle.TAG_KFP_RUN, "kfp-queued")
    client.set_tag(lost, lifecycle.TAG_KFP_RUN, "kfp-lost")
    cluster = _Cluster(waiting={"kfp-queued"})
    expired = lifecycle.expire_silent_runs(tracking_uri, Policy(lease_seconds=60), now=time.time() + 3600,
                                           cluster=cluster)
    assert expired == [lost] and cluster.cancelled == ["kfp-lost"]
    assert client.get_run(lost).info.status == "FAILED"
    assert client.get_run(queued).info.status == "RUNNING"
    assert float(client.get_run(queued).data.tags[lifecycle.TAG_HEARTBEAT]) > time.time() - 60  # beaten for it


class _Kfp:
    def __init__(self, fail):
        self.fail = fail

    def create_run_from_pipeline_func(self, pipeline, arguments, run_name, experiment_name):
        if self.fail:
            raise ConnectionError("Kubeflow Pipelines API unreachable")
        return type("Result", (), {"run_id": "kfp-123"})()


def test_a_submission_records_its_kubeflow_run_and_a_failed_one_fails_the_claim(tmp_path):
    from moecl.mlops.versioning import DataVersion
    from pipelines.launcher import PipelineSettings, submit

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    version = DataVersion("s" * 32, "s3://bucket/data")
    run_id, _ = lifecycle.claim(tracking_uri, version.hash, Policy())
    assert submit(version, PipelineSettings(), "http://kfp", tracking_uri, run_id, client=_Kfp(fail=False)) == "kfp-123"
    assert client.get_run(run_id).data.tags[lifecycle.TAG_KFP_RUN] == "kfp-123"
    broken, _ = lifecycle.claim(tracking_uri, "t" * 32, Policy())
    with pytest.raises(ConnectionError):
        submit(DataVersion("t" * 32, "s3://bucket/data"), PipelineSettings(), "http://kfp", tracking_uri, broken,
               client=_Kfp(fail=True))
    run = client.get_run(broken)
    assert run.info.status == "FAILED" and run.data.tags[registry.TAG_OUTCOME] == "submit_failed"
    assert lifecycle.version_state(tracking_uri, "t" * 32, Policy(backoff_seconds=0)).state == "retrying"
