"""A real `mlflow server` on loopback, stopped while a step registers: the step fails after bounded
retries with the outage's own error, and once the server is back a retried step makes exactly one
fully tagged version."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import requests

from moecl import lifecycle, pipeline_steps, registry


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(root: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        stdout=(root / "server.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return server
        except requests.ConnectionError:
            time.sleep(0.5)
    raise AssertionError((root / "server.log").read_text()[-2000:])


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


def test_register_during_an_outage_fails_in_bounded_time_and_a_retry_registers_exactly_once(tmp_path):
    port = _port()
    uri = f"http://127.0.0.1:{port}"
    server = _serve(tmp_path, port)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text("{}")
    evaluation = {"candidate_aa": 0.8, "bwt": None, "candidate": {"t": 0.8}, "parent_champion": None}
    try:
        run_id, _ = lifecycle.claim(uri, "c" * 32, lifecycle.Policy())
        _stop(server)
        started = time.time()
        with pytest.raises(Exception) as outage:
            pipeline_steps.register(uri, "moecl", run_id, str(checkpoint), evaluation, "c" * 32, "{}", "moecl")
        assert time.time() - started < 120  # bounded retries, not MLflow's default minutes
        assert "Connection refused" in str(outage.value) or "Max retries" in str(outage.value)
        # The error raised is the step's own (here its first heartbeat), not one from logging the step's time.
        frames = traceback.extract_tb(outage.value.__traceback__)
        assert not any(f.name == "log_metric" for f in frames), [(f.filename.split("/")[-1], f.name) for f in frames]

        server = _serve(tmp_path, port)
        first = pipeline_steps.register(uri, "moecl", run_id, str(checkpoint), evaluation, "c" * 32, "{}", "moecl")
        again = pipeline_steps.register(uri, "moecl", run_id, str(checkpoint), evaluation, "c" * 32, "{}", "moecl")
        assert first == again == "1"
        versions = registry.connect(uri).search_model_versions("name='moecl'")
        assert len(versions) == 1 and versions[0].tags["data_version"] == "c" * 32 and versions[0].tags["aa"] == "0.8000"
    finally:
        if server.poll() is None:
            _stop(server)
