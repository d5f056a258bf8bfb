"""The container suite (scripts/test-containers.sh builds the image and runs it): every test here
runs the project's image, named by MOECL_IMAGE, through Docker or podman's Docker API (DOCKER_HOST)."""
from __future__ import annotations

import os

import pytest

IMAGE = os.environ["MOECL_IMAGE"]


@pytest.fixture(scope="session")
def engine():
    import docker

    client = docker.from_env()
    client.images.get(IMAGE)  # fails the suite at once if the image was not built
    yield client
    client.close()
