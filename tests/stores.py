"""Tracking stores for the concurrency tests: a sqlite file, and an MLflow server on a real
PostgreSQL (the cluster's store; its locking differs from sqlite's), both started here."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    """A PostgreSQL cluster in a temporary folder (run as the `postgres` user when this is root:
    PostgreSQL refuses to run as root) and an MLflow tracking server on it."""

    def __init__(self):
        self.bin = _postgres_bin()
        if self.bin is None:
            pytest.fail("PostgreSQL is not installed: run scripts/test-deps.sh (Debian's postgresql package)")
        self.port = _free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / tool), *args], check=True, capture_output=True, text=True)

    def __enter__(self) -> str:
        # Not under pytest's tmp_path: its folders are private to this user, and `postgres` must reach the data.
        self.root = Path(tempfile.mkdtemp(prefix="moecl-postgres-"))
        self.root.chmod(0o755)
        self.data = self.root / "pgdata"
        self.data.mkdir()
        if self.as_postgres:
            shutil.chown(self.data, "postgres")
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w", "-o",
                 f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start")
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")
        self.mlflow_port = _free_port()
        self.mlflow = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
             "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "2"],
            stdout=open(self.root / "mlflow.log", "w"), stderr=subprocess.STDOUT)
        uri = f"http://127.0.0.1:{self.mlflow_port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.mlflow.poll() is None, (self.root / "mlflow.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                return uri
            except OSError:
                time.sleep(0.5)
        raise AssertionError("the MLflow server did not come up:\n" + (self.root / "mlflow.log").read_text()[-3000:])

    def __exit__(self, *exc) -> None:
        self.mlflow.terminate()
        self.mlflow.wait(timeout=30)
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def s3_endpoint(tmp_path):
    """An S3-compatible object store on loopback (moto's server: the S3 API, real HTTP), with a bucket
    `data`. Only its URL says where it is: nothing in the environment points at it."""
    port = _free_port()
    log = (tmp_path / "s3.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        urllib.request.urlopen(urllib.request.Request(f"{url}/data", method="PUT"), timeout=10)  # the bucket
        yield url
    finally:
        server.terminate()
        server.wait(10)
        log.close()
