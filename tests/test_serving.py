"""The registered champion served over HTTP by `mlflow models serve` on loopback: a batch mixing
tasks, rows without a task (routed), and bad rows refused with a short 400."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from moecl import lifecycle, registry
from moecl.config import config_from_dict
from moecl.trainer import Trainer

from .conftest import write_task


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    data = {"topics": write_task(root / "data" / "topics", ["sports", "science", "politics"]),
            "sentiment": write_task(root / "data" / "sentiment", ["bad", "good"], salt="review ")}
    cfg = config_from_dict({"backbone": "tiny-random-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                            "train": {"epochs": 4, "batch_size": 4, "lr": 0.01, "max_length": 64},
                            "tasks": [{"name": t, "data": str(f)} for t, f in data.items()]})
    Trainer(cfg, root / "run").run()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id, _ = lifecycle.claim(tracking_uri, "f" * 32, lifecycle.Policy(), str(root / "artifacts"))
    version = registry.register(tracking_uri, "moecl", run_id, root / "run" / "checkpoint", {})
    registry.promote(tracking_uri, "moecl", version, None, "test", "serving")
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # uvicorn
    log = (root / "server.log").open("w")
    process = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                                "models:/moecl@champion", "--env-manager", "local", "--host", "127.0.0.1",
                                "--port", str(port), "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert process.poll() is None, (root / "server.log").read_text()[-3000:]
        time.sleep(1)
    yield url
    os.killpg(process.pid, 15)
    process.wait(timeout=30)


def _invoke(url: str, rows: list[dict]) -> requests.Response:
    columns = sorted({k for row in rows for k in row})
    payload = {"dataframe_split": {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}}
    return requests.post(f"{url}/invocations", json=payload, timeout=120)


def test_a_batch_mixing_tasks_and_rows_without_a_task_is_answered(server):
    rows = [{"task": "topics", "text": "sports sports sports"}, {"task": "sentiment", "text": "review good good"},
            # A random 2-layer backbone routes poorly beyond the texts it was fit on (SmolLM2: tests/test_smollm2.py).
            {"task": None, "text": "review train 1 bravo: good good good good good good"},
            {"task": "", "text": "train 2 charlie: sports sports sports sports sports sports"}]
    response = _invoke(server, rows)
    assert response.status_code == 200, response.text
    labels = response.json()["predictions"]
    assert labels[0] in {"sports", "science", "politics"} and labels[1] in {"bad", "good"}
    assert labels[2] in {"bad", "good"} and labels[3] in {"sports", "science", "politics"}  # routed task-free


@pytest.mark.parametrize("row, message", [
    ({"task": "weather", "text": "rain"}, "row 0: unknown task 'weather' (this model knows topics, sentiment)"),
    ({"task": "topics", "text": "   "}, "row 0: text is empty"),
    ({"task": "topics", "text": "x" * 20001}, "row 0: text has 20001 characters, more than 20000"),
])
def test_a_bad_row_gets_a_one_line_400(server, row, message):
    response = _invoke(server, [row])
    assert response.status_code == 400
    body = response.json()
    assert body["message"] == message and "Traceback" not in response.text
