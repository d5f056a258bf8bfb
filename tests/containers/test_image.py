"""The image as infra/ deploys it: the MLflow server with basic auth, and the installed package."""
from __future__ import annotations

import base64
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.containers.conftest import IMAGE

ROOT = Path(__file__).resolve().parents[2]


def _mlflow_container_spec() -> dict:
    deployment = next(d for d in yaml.safe_load_all((ROOT / "infra/k8s/base/mlflow.yaml").read_text())
                      if d and d.get("kind") == "Deployment")
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": "localhost:5000"})  # a host the manifest allows
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_mlflow_server_as_deployed_starts_from_the_image_and_refuses_anonymous_requests(tmp_path, engine):
    spec = _mlflow_container_spec()
    state = tmp_path / "mlflow"
    state.mkdir()
    state.chmod(0o777)  # the image runs as UID 1000
    (state / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:////state/auth.db\n"
        "admin_username = admin\nadmin_password = s3cret-Passw0rd\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    # The manifest's plain values, with this test's stand-ins for its Secrets, ConfigMap and database.
    env = {e["name"]: e["value"] for e in spec["env"] if "value" in e}
    env.update(MLFLOW_AUTH_CONFIG_PATH="/state/basic_auth.ini", MLFLOW_BACKEND_STORE_URI="sqlite:////state/mlflow.db",
               MLFLOW_ARTIFACTS_DESTINATION="/state/artifacts", MLFLOW_FLASK_SERVER_SECRET_KEY="test-key")
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in {e["name"] for e in spec["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in spec["args"]]
    port = _free_port()
    container = engine.containers.run(IMAGE, command=spec["command"] + args, detach=True, environment=env,
                                      volumes={str(state): {"bind": "/state", "mode": "rw"}},
                                      ports={f"{spec['ports'][0]['containerPort']}/tcp": ("127.0.0.1", port)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            container.reload()
            assert container.status == "running", container.logs()[-3000:].decode()
            try:
                if _get(f"{url}/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, container.logs()[-3000:].decode()
            time.sleep(2)
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api) == 401
        assert _get(api, ("admin", "wrong")) == 401
        assert _get(api, ("admin", "s3cret-Passw0rd")) == 200
    finally:
        container.remove(force=True)


def test_the_installed_package_compiles_the_pipeline_from_another_folder(tmp_path, engine):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    command = ["bash", "-c", "cd /out && moecl-pipeline compile && python -c 'import moecl; print(moecl.__file__)'"]
    logs = engine.containers.run(IMAGE, command=command, volumes={str(out): {"bind": "/out", "mode": "rw"}},
                                 remove=True).decode()
    assert "site-packages/moecl/__init__.py" in logs  # the regular install, not a source tree
    compiled = yaml.safe_load_all((out / "continual_training.yaml").read_text())
    assert next(compiled)["pipelineInfo"]["name"] == "moecl-continual-training"
