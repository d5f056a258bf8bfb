"""Run the embedded pipeline's steps inside the project's image (kfp.local's DockerRunner, over
Docker or podman's Docker-compatible service), as a cluster runs them.

kfp 2.17 starts each step container with auto-remove and reads a container that is already gone
as exit code 0, so a step that fails fast is logged "finished with status SUCCESS". StepContainers
replaces kfp's container function while it is active with one that keeps the container until its
exit code is read, then removes it; every container it ran is recorded (image, step, exit code).

Steps run as the caller's user, not the image's UID 1000, so that they can write the folders the
host created (pipeline root, sqlite store, artifacts); what else a step reads from the host (the
DVC remote, the backbone cache) is mounted at the same path.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StepContainer:
    image: str
    step: str  # the KFP component the container ran (from its executor command)
    exit_code: int


@dataclass
class StepContainers:
    """Where the steps' containers come from: the image each component names (components.IMAGE,
    MOECL_IMAGE), run as the caller's user with `cache` (the backbones, as a cluster's PVC holds
    them) mounted and named by MOECL_CACHE."""
    cache: Path
    ran: list[StepContainer] = field(default_factory=list)

    def runner(self):
        from kfp import local

        return local.DockerRunner(user=f"{os.getuid()}:{os.getgid()}")

    @contextlib.contextmanager
    def active(self, home: Path, mounts: list[Path]):
        """kfp's DockerRunner starts and reads step containers through this object while the block
        runs. `home`: the steps' HOME; `mounts`: host folders the steps read or write."""
        from kfp.local import docker_task_handler

        home.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        binds = {str(p.resolve()): {"bind": str(p.resolve()), "mode": "rw"} for p in [*mounts, self.cache]}
        env = {"HOME": str(home.resolve()), "MOECL_CACHE": str(self.cache.resolve())}
        original = docker_task_handler.run_docker_container

        def run(client, image, command, volumes, **run_args):
            return self._run(client, image, command, {**volumes, **binds}, env, **run_args)

        docker_task_handler.run_docker_container = run
        try:
            yield self
        finally:
            docker_task_handler.run_docker_container = original

    def _run(self, client, image, command, volumes, env, **run_args) -> int:
        environment = {**env, **run_args.pop("environment", {})}
        container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                          volumes=volumes, environment=environment, **run_args)
        try:
            for line in container.logs(stream=True, follow=True):
                print(line.decode(errors="replace"), end="")
            exit_code = container.wait()["StatusCode"]
        finally:
            container.remove(force=True)
        self.ran.append(StepContainer(image, _step_name(command), exit_code))
        if exit_code:
            print(f"step container {container.short_id} ({_step_name(command)}) exited with code {exit_code}")
        return exit_code


def _step_name(command: list[str]) -> str:
    """The component's function name, from kfp's executor command (`--function_to_execute NAME`)."""
    text = " ".join(command)
    marker = "--function_to_execute"
    return text.split(marker, 1)[1].split()[0] if marker in text else "?"
