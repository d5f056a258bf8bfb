"""A data version's pipeline runs, as MLflow records them, and the decision to launch one more.

A run is *live* while its MLflow status is RUNNING and its heartbeat (tag `moecl.heartbeat`, seconds
since the epoch, refreshed by the launcher and while every step works) is younger than the lease.
A live run that falls silent past the lease (a killed trigger, a lost cluster run) is marked FAILED
with outcome `lease_expired` by the next trigger. A version is then:

- `processed`: a run reached an outcome (promoted, rejected, validation_failed, or superseded: the
  champion already holds newer data); new data makes a new version, so it is never launched again
  unless asked (`--rerun`);
- `running`: it has a live run;
- `stale`: its last run passed the gate but the champion had moved meanwhile (another version was
  promoted, or rolled back); launched again at once, to be trained from the new champion, and not
  counted as a failure;
- `retrying`: its runs failed fewer than `max_attempts` times; launched again once
  `backoff_seconds * 2**(failures - 1)` have passed since the last failure;
- `failed`: `max_attempts` runs failed; launched again only on request.

Taking a version is create-then-elect: the claimant opens its run, takes a ticket (numbered by the
tracking store, see moecl.mlops.tickets) naming it, then looks at the version's earlier tickets; it
goes ahead only if none belongs to a live run or to a run with an outcome, and otherwise deletes its
run and its ticket. Every claimant sees every ticket taken before its own, so of any number of
concurrent claimants exactly one goes ahead, whatever their clocks say. The lowest ticket a version
ever got is its place in the data lineage (`moecl.data_seq`): promotion refuses a candidate whose
data is older than the newest data the champion ever held.

On a cluster a run's steps beat while they work; while its Kubeflow run waits to start (no node,
an image still pulling) the trigger beats for it, and a run silent past its lease has its Kubeflow
run cancelled, so no late step of it can still write.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from . import registry
from .tickets import TicketRoll

log = logging.getLogger("moecl.lifecycle")
TAG_HEARTBEAT = "moecl.heartbeat"
TAG_ATTEMPT = "moecl.attempt"
TAG_KFP_RUN = "moecl.kfp_run_id"  # the Kubeflow Pipelines run executing it (cluster runs)
OUTCOMES = ("promoted", "rejected", "validation_failed", "superseded")  # the version was processed
STALE = "stale"  # passed the gate after the champion moved: to be trained again from the new one
CLAIM = "claim"  # ticket kind


class ClusterRuns(Protocol):
    """What the lifecycle needs from the cluster that executes runs (Kubeflow Pipelines)."""

    def waiting(self, kfp_run_id: str) -> bool: ...  # not started yet (queued, no node, image pulling)

    def cancel(self, kfp_run_id: str) -> None: ...


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


def expire_silent_runs(tracking_uri: str, policy: Policy, now: float | None = None,
                       cluster: ClusterRuns | None = None) -> list[str]:
    """Mark every RUNNING run whose heartbeat is older than the lease FAILED (`lease_expired`) and
    cancel its Kubeflow run; a run whose Kubeflow run is still waiting to start is kept alive."""
    now = time.time() if now is None else now
    client = registry.connect(tracking_uri)
    expired = []
    for run in _runs(tracking_uri):
        if run.info.status != "RUNNING" or _live(run, policy, now):
            continue
        kfp_run = run.data.tags.get(TAG_KFP_RUN)
        if cluster is not None and kfp_run and cluster.waiting(kfp_run):
            heartbeat(tracking_uri, run.info.run_id)  # queued on the cluster: not lost
            continue
        client.set_tag(run.info.run_id, registry.TAG_OUTCOME, "lease_expired")
        client.set_terminated(run.info.run_id, "FAILED")
        if cluster is not None and kfp_run:
            cluster.cancel(kfp_run)
        log.warning("run %s went silent for more than %.0fs: marked failed", run.info.run_id, policy.lease_seconds)
        expired.append(run.info.run_id)
    return expired


def _state(version: str, runs: list, policy: Policy, now: float) -> VersionState:
    done = [r for r in runs if _outcome(r)]
    if done:
        return VersionState(version, "processed", 0, done[-1].info.run_id, False, _outcome(done[-1]))
    live = [r for r in runs if _live(r, policy, now)]
    if live:
        return VersionState(version, "running", 0, live[0].info.run_id, False)
    stale = [i for i, r in enumerate(runs) if r.data.tags.get(registry.TAG_OUTCOME) == STALE]
    since = runs[stale[-1] + 1:] if stale else runs  # a stale run starts the count of failures afresh
    failed = [r for r in since if r.info.status in ("FAILED", "KILLED")]
    if not failed:
        if stale:
            return VersionState(version, STALE, 0, runs[stale[-1]].info.run_id, True,
                                "the champion moved while it ran: to be trained from the new champion")
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


def data_seq(tracking_uri: str, version: str) -> int | None:
    """The version's place in the data lineage: the lowest claim ticket it ever got."""
    tickets = TicketRoll(tracking_uri).tickets(CLAIM, version)
    return tickets[0].number if tickets else None


def claim(tracking_uri: str, version: str, policy: Policy, artifact_root: str | None = None,
          rerun: bool = False, cluster: ClusterRuns | None = None) -> tuple[str | None, VersionState]:
    """Open a run for `version` if it is due (or `rerun`) and no other claimant got it first.
    Returns (run id or None, the version's state before the claim)."""
    registry.init_store(tracking_uri)
    expire_silent_runs(tracking_uri, policy, cluster=cluster)
    state = version_state(tracking_uri, version, policy)
    wanted = state.due or (rerun and state.state != "running")
    if not wanted:
        return None, state
    client = registry.connect(tracking_uri)
    experiment = registry.experiment_id(tracking_uri, artifact_root)
    mine = client.create_run(experiment, run_name=f"data-{version[:12]}-attempt{state.attempts + 1}", tags={
        registry.TAG_DATA_VERSION: version, "git_commit": registry.git_commit(), TAG_HEARTBEAT: str(time.time()),
        TAG_ATTEMPT: str(state.attempts + 1), **({"moecl.rerun": "true"} if rerun else {})})
    roll = TicketRoll(tracking_uri)
    ticket = roll.take(CLAIM, version, run_id=mine.info.run_id)
    now = time.time()
    tickets = roll.tickets(CLAIM, version)  # lowest first, mine among them
    for earlier in tickets:
        if earlier.number >= ticket.number:
            break
        try:
            run = client.get_run(earlier.tags["run_id"])
        except Exception:  # a claimant that lost and cleaned up between the listing and this look
            continue
        if run.info.lifecycle_stage == "active" and (_live(run, policy, now) or (_outcome(run) and not rerun)):
            client.delete_run(mine.info.run_id)  # another claimant has it: leave no trace
            roll.release(ticket)
            return None, _state(version, [run], policy, now)
    client.set_tag(mine.info.run_id, registry.TAG_DATA_SEQ, str(tickets[0].number))  # the version's first claim
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
