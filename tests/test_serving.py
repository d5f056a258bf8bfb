"""The registered champion served over HTTP by `mlflow models serve` on loopback: a batch mixing
tasks, rows without a task (routed), and bad rows refused with a short 400."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import requests

from moecl.config import config_from_dict
from moecl.mlops import lifecycle, registry
from moecl.mlops.loopback import start_mlflow, stop
from moecl.trainer import Trainer

from .conftest import write_task


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[Path, str]:
    """(folder, tracking URI) of a registry whose champion is a tiny model trained on two tasks."""
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
    return root, tracking_uri


@pytest.fixture(scope="module")
def server(registered):
    root, tracking_uri = registered
    process, url = start_mlflow(["models", "serve", "-m", "models:/moecl@champion", "--env-manager", "local",
                                 "--workers", "1"], root / "server.log", "/ping",
                                env={"MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}, timeout=180)
    yield url
    stop(process)


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


# Site-packages without their .pth files: the editable install's import hook is not run, so moecl
# can come only from the code the registered model ships.
ISOLATED = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("moecl") is None, "moecl is importable before the model is loaded"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/moecl@champion")
rows = pd.DataFrame({"task": ["topics", "sentiment"], "text": ["sports sports", "review good"]})
answers = list(model.predict(rows))
print(json.dumps([str(answer) for answer in answers]))
import moecl
print(moecl.__file__)
"""


def test_the_registered_model_loads_where_moecl_is_not_installed(registered, tmp_path):
    root, tracking_uri = registered
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-c", ISOLATED, sysconfig.get_paths()["purelib"]], cwd=tmp_path,
                          env={**env, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers, origin = done.stdout.strip().splitlines()[-2:]
    topics, sentiment = json.loads(answers)
    assert topics in ("sports", "science", "politics") and sentiment in ("bad", "good")
    assert "code" in Path(origin).parts and not origin.startswith(str(Path(__file__).parents[1] / "moecl"))


def test_a_row_of_no_known_task_is_answered_unknown_task_not_guessed(registered, tmp_path):
    import shutil
    from types import SimpleNamespace

    import pandas as pd
    import torch
    from safetensors.torch import load_file, save_file

    root, _ = registered
    checkpoint = shutil.copytree(root / "run" / "checkpoint", tmp_path / "checkpoint")
    stored = checkpoint / "adapters" / "task-router.safetensors"
    refusing = {k: torch.tensor(0.0, dtype=torch.float64) if k.endswith(".threshold") else v
                for k, v in load_file(stored).items()}
    save_file(refusing, stored)  # every task now refuses every routed text
    served = registry.MoeclPyfunc()
    served.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}))
    rows = pd.DataFrame({"task": [None, "topics"], "text": ["train 2 charlie: sports sports sports", "sports sports"]})
    labels = served.predict(None, rows)
    assert labels[0] == registry.UNKNOWN_TASK and labels[1] in {"sports", "science", "politics"}
