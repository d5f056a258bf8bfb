"""A real `mlflow server` on loopback, stopped while a step registers: the step fails after bounded
retries with the outage's own error, and once the server is back a retried step makes exactly one
fully tagged version."""
from __future__ import annotations

import time
import traceback
from pathlib import Path

import pytest

from moecl.mlops import lifecycle, registry, steps
from moecl.mlops.loopback import free_port, start_mlflow, stop


def _serve(root: Path, port: int):
    return start_mlflow(["server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                        root / "server.log", "/health", port=port, timeout=120)[0]


def test_register_during_an_outage_fails_in_bounded_time_and_a_retry_registers_exactly_once(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _serve(tmp_path, port)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text("{}")
    evaluation = {"candidate_aa": 0.8, "bwt": None, "candidate": {"t": 0.8}, "parent_champion": None}
    try:
        run_id, _ = lifecycle.claim(uri, "c" * 32, lifecycle.Policy())
        stop(server)
        started = time.time()
        with pytest.raises(Exception) as outage:
            steps.register(uri, "moecl", run_id, str(checkpoint), evaluation, "c" * 32, "{}", "moecl")
        assert time.time() - started < 120  # bounded retries, not MLflow's default minutes
        assert "Connection refused" in str(outage.value) or "Max retries" in str(outage.value)
        # The error raised is the step's own (here its first heartbeat), not one from logging the step's time.
        frames = traceback.extract_tb(outage.value.__traceback__)
        assert not any(f.name == "log_metric" for f in frames), [(f.filename.split("/")[-1], f.name) for f in frames]

        server = _serve(tmp_path, port)
        first = steps.register(uri, "moecl", run_id, str(checkpoint), evaluation, "c" * 32, "{}", "moecl")
        again = steps.register(uri, "moecl", run_id, str(checkpoint), evaluation, "c" * 32, "{}", "moecl")
        assert first == again == "1"
        versions = registry.connect(uri).search_model_versions("name='moecl'")
        assert len(versions) == 1 and versions[0].tags["data_version"] == "c" * 32 and versions[0].tags["aa"] == "0.8000"
    finally:
        if server.poll() is None:
            stop(server)
