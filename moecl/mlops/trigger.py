"""Re-run on new data: the data version in `data.dvc` is launched once, retried after a failure or a
lost run (see moecl.mlops.lifecycle), and never run twice at the same time."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .lifecycle import ClusterRuns, Policy, claim
from .versioning import DataVersion, current_version

log = logging.getLogger("moecl.trigger")
Launch = Callable[[DataVersion, str], None]  # (data version, the MLflow run opened for it)


def trigger(project: str | Path, tracking_uri: str, launch: Launch, policy: Policy | None = None,
            artifact_root: str | None = None, rerun: str | None = None, cluster: ClusterRuns | None = None) -> str | None:
    """Launch one run of the version in `data.dvc` (or of the version `rerun`, on request) if it is
    due and no other trigger took it; return its MLflow run id, or None. `cluster`: where launched
    runs execute, asked about runs that fell silent (see moecl.mlops.lifecycle)."""
    current = current_version(project)
    version = DataVersion(rerun, current.remote) if rerun else current
    run_id, state = claim(tracking_uri, version.hash, policy or Policy(), artifact_root, rerun=bool(rerun),
                          cluster=cluster)
    if run_id is None:
        log.info("data version %s is %s%s: nothing to launch", version.short, state.state,
                 f" ({state.detail})" if state.detail else "")
        return None
    log.info("data version %s (%s): launching the pipeline, MLflow run %s", version.short, state.state, run_id)
    launch(version, run_id)
    return run_id


def watch(project: str | Path, tracking_uri: str, launch: Launch, interval: float, polls: int | None = None,
          policy: Policy | None = None, artifact_root: str | None = None, cluster: ClusterRuns | None = None,
          verdicts: tuple[type[Exception], ...] = ()) -> None:
    """Poll `data.dvc` every `interval` seconds (forever, or `polls` times). An exception of a type in
    `verdicts` (a refused data version) is logged as its message, anything else with its traceback."""
    done = 0
    while polls is None or done < polls:
        try:
            trigger(project, tracking_uri, launch, policy, artifact_root, cluster=cluster)
        except verdicts as verdict:
            log.warning("%s", verdict)
        except Exception:  # one failed run must not stop the watcher; the run itself is marked failed
            log.exception("pipeline run failed")
        done += 1
        if polls is None or done < polls:
            time.sleep(interval)
