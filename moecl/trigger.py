"""Re-run on new data: compare the data version in `data.dvc` with the versions already processed
(recorded in MLflow) and launch exactly one pipeline run for a version not seen before."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .registry import processed_versions
from .versioning import DataVersion, current_version

log = logging.getLogger("moecl.trigger")


def pending_version(project: str | Path, tracking_uri: str) -> DataVersion | None:
    version = current_version(project)
    return None if version.hash in processed_versions(tracking_uri) else version


def trigger(project: str | Path, tracking_uri: str, launch: Callable[[DataVersion], str]) -> str | None:
    """Launch one run if `data.dvc` holds an unprocessed version; return its MLflow run id."""
    version = pending_version(project, tracking_uri)
    if version is None:
        log.info("data version %s is already processed: nothing to run", current_version(project).short)
        return None
    log.info("new data version %s: launching the pipeline", version.short)
    return launch(version)


def watch(project: str | Path, tracking_uri: str, launch: Callable[[DataVersion], str], interval: float,
          polls: int | None = None) -> None:
    """Poll `data.dvc` every `interval` seconds (forever, or `polls` times)."""
    done = 0
    while polls is None or done < polls:
        try:
            trigger(project, tracking_uri, launch)
        except Exception:  # one failed run must not stop the watcher; the run itself is marked failed
            log.exception("pipeline run failed")
        done += 1
        if polls is None or done < polls:
            time.sleep(interval)
