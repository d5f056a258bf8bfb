"""A data version's pipeline runs, as MLflow records them, and the decision to launch one more.

A run is *live* while its MLflow status is RUNNING and its heartbeat (tag `moecl.heartbeat`, seconds
since the epoch, refreshed by the launcher and while every step works) is younger than the lease.
A live run that falls silent past the lease (a killed trigger, a lost cluster run) is marked FAILED
with outcome `lease_expired` by the next trigger. A version is then:

- `processed`: a run reached an outcome (promoted, rejected, validation_failed); new data makes a
  new version, so it is never launched again unless asked (`--rerun`);
- `running`: it has a live run;
- `retrying`: its runs failed fewer than `max_attempts` times; launched again once
  `backoff_seconds * 2**(failures - 1)` have passed since the last failure;
- `failed`: `max_attempts` runs failed; launched again only on request.

Taking a version is create-then-elect: the claimant opens its run, then looks at the version's runs;
it goes ahead only if no earlier live run (by start time, then run id) and no outcome exists, and
otherwise deletes its run. Every claimant sees every run created before its own check, so of any
number of concurrent claimants exactly one goes ahead.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

from . import registry

log = logging.getLogger("moecl.lifecycle")
TAG_HEARTBEAT = "moecl.heartbeat"
TAG_ATTEMPT = "moecl.attempt"
OUTCOMES = ("promoted", "rejected", "validation_failed")  # the version was processed


@dataclass
class Policy:
    lease_seconds: float = 900.0
    max_attempts: int = 3
    backoff_seconds: float = 300.0


@dataclass
class VersionState:
    version: str
    state: str  # new | processed | running | retrying | failed
    attempts: int  # runs that ended without an outcome
    run_id: str | None  # the deciding run: the live one, the one with the outcome, or the last failure
    due: bool  # whether a trigger launches it now
    detail: str = ""


def _runs(tracking_uri: str, version: str | None = None) -> list:
    client = registry.connect(tracking_uri)
    experiment = client.get_experiment_by_name(registry.EXPERIMENT)
    if experiment is None:
        return []
    query = f"tags.`{registry.TAG_DATA_VERSION}` = '{version}'" if version else ""
    runs = client.search_runs([experiment.experiment_id], query, max_results=5000)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def _live(run, policy: Policy, now: float) -> bool:
    beat = float(run.data.tags.get(TAG_HEARTBEAT, run.info.start_time / 1000))
    return run.info.status == "RUNNING" and now - beat <= policy.lease_seconds


def _outcome(run) -> str | None:
    outcome = run.data.tags.get(registry.TAG_OUTCOME)
    return outcome if outcome in OUTCOMES else None


def expire_silent_runs(tracking_uri: str, policy: Policy, now: float | None = None) -> list[str]:
    """Mark every RUNNING run whose heartbeat is older than the lease FAILED (`lease_expired`)."""
    now = time.time() if now is None else now
    client = registry.connect(tracking_uri)
    expired = [r.info.run_id for r in _runs(tracking_uri) if r.info.status == "RUNNING" and not _live(r, policy, now)]
    for run_id in expired:
        client.set_tag(run_id, registry.TAG_OUTCOME, "lease_expired")
        client.set_terminated(run_id, "FAILED")
        log.warning("run %s went silent for more than %.0fs: marked failed", run_id, policy.lease_seconds)
    return expired


def _state(version: str, runs: list, policy: Policy, now: float) -> VersionState:
    done = [r for r in runs if _outcome(r)]
    if done:
        return VersionState(version, "processed", 0, done[-1].info.run_id, False, _outcome(done[-1]))
    live = [r for r in runs if _live(r, policy, now)]
    if live:
        return VersionState(version, "running", 0, live[0].info.run_id, False)
    failed = [r for r in runs if r.info.status in ("FAILED", "KILLED")]
    if not failed:
        return VersionState(version, "new", 0, None, True)
    last = failed[-1]
    reason = last.data.tags.get(registry.TAG_OUTCOME, "failed")
    if len(failed) >= policy.max_attempts:
        return VersionState(version, "failed", len(failed), last.info.run_id, False,
                            f"{len(failed)} attempts failed (last: {reason}); relaunch with --rerun")
    wait = policy.backoff_seconds * 2 ** (len(failed) - 1)
    ended = (last.info.end_time or last.info.start_time) / 1000
    due = now - ended >= wait
    detail = f"attempt {len(failed)} failed ({reason}); " + ("due" if due else f"next in {wait - (now - ended):.0f}s")
    return VersionState(version, "retrying", len(failed), last.info.run_id, due, detail)


def version_states(tracking_uri: str, policy: Policy, now: float | None = None) -> dict[str, VersionState]:
    """Every data version with a run, in order of its first run."""
    now = time.time() if now is None else now
    by_version: dict[str, list] = {}
    for run in _runs(tracking_uri):
        version = run.data.tags.get(registry.TAG_DATA_VERSION)
        if version:
            by_version.setdefault(version, []).append(run)
    return {v: _state(v, runs, policy, now) for v, runs in by_version.items()}


def version_state(tracking_uri: str, version: str, policy: Policy, now: float | None = None) -> VersionState:
    return _state(version, _runs(tracking_uri, version), policy, time.time() if now is None else now)


def claim(tracking_uri: str, version: str, policy: Policy, artifact_root: str | None = None,
          rerun: bool = False) -> tuple[str | None, VersionState]:
    """Open a run for `version` if it is due (or `rerun`) and no other claimant got it first.
    Returns (run id or None, the version's state before the claim)."""
    registry.init_store(tracking_uri)
    expire_silent_runs(tracking_uri, policy)
    state = version_state(tracking_uri, version, policy)
    wanted = state.due or (rerun and state.state != "running")
    if not wanted:
        return None, state
    client = registry.connect(tracking_uri)
    experiment = registry.experiment_id(tracking_uri, artifact_root)
    mine = client.create_run(experiment, run_name=f"data-{version[:12]}-attempt{state.attempts + 1}", tags={
        registry.TAG_DATA_VERSION: version, "git_commit": registry.git_commit(), TAG_HEARTBEAT: str(time.time()),
        TAG_ATTEMPT: str(state.attempts + 1), **({"moecl.rerun": "true"} if rerun else {})})
    now = time.time()
    for run in _runs(tracking_uri, version):
        if run.info.run_id == mine.info.run_id:
            continue
        earlier = (run.info.start_time, run.info.run_id) < (mine.info.start_time, mine.info.run_id)
        if (_live(run, policy, now) and earlier) or (_outcome(run) and not rerun):
            client.delete_run(mine.info.run_id)  # another claimant has it: leave no trace
            return None, _state(version, [run], policy, now)
    return mine.info.run_id, state


def heartbeat(tracking_uri: str, run_id: str) -> None:
    registry.connect(tracking_uri).set_tag(run_id, TAG_HEARTBEAT, str(time.time()))


@contextlib.contextmanager
def heartbeating(tracking_uri: str, run_id: str, every: float = 60.0):
    """Keep the run's lease while the block runs (a daemon thread; a failed beat is only logged)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                heartbeat(tracking_uri, run_id)
            except Exception as err:  # an MLflow hiccup must not kill the work it is watching
                log.warning("heartbeat of run %s failed: %s", run_id, err)

    heartbeat(tracking_uri, run_id)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
