"""MLflow processes on loopback (a tracking server, a model server), started and awaited. The
serving benchmark, the screenshot script and the tests run the real servers this way."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow(args: list[str], log: Path, ready: str, port: int | None = None, env: dict[str, str] | None = None,
                 timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Run `mlflow ARGS` on 127.0.0.1 (`port`, default a free one), its output appended to `log`, and
    wait until GET `ready` (e.g. "/health") answers; (the process, its URL). The venv's bin is on
    PATH (the model server needs uvicorn from it)."""
    port = port or free_port()
    environment = {**os.environ, **(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), *args, "--host", "127.0.0.1",
                                "--port", str(port)], env=environment, stdout=log.open("a"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"{url}{ready}", timeout=2).ok:
                return process, url
        except requests.ConnectionError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"mlflow {args[0]} exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"mlflow {args[0]} did not answer on {url} within {timeout:.0f} s: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    """Stop the process and its children (the model server's workers)."""
    os.killpg(process.pid, 15)
    process.wait(timeout=30)
