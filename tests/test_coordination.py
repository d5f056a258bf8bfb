"""Coordination through the tracking store, on sqlite and on an MLflow server over a real
PostgreSQL: of concurrent claimants of one data version exactly one goes ahead, and the alias lock
has one holder at a time, with processes racing for real."""
from __future__ import annotations

import multiprocessing
import time
import uuid

import pytest

from moecl.mlops import lifecycle, registry
from moecl.mlops.lifecycle import Policy
from moecl.mlops.tickets import TicketRoll

from .stores import PostgresServer


@pytest.fixture(scope="module")
def postgres_mlflow():
    with PostgresServer() as uri:
        yield uri


@pytest.fixture(params=["sqlite", "postgresql"])
def tracking_uri(request, tmp_path):
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        registry.init_store(uri)
        return uri
    return request.getfixturevalue("postgres_mlflow")


def _spawn(target, *args, count: int):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=(*args, i)) for i in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * count


def _claim(tracking_uri, version, start_at, out, index):
    time.sleep(max(0.0, start_at - time.time()))  # all at once
    run_id, _ = lifecycle.claim(tracking_uri, version, Policy())
    with open(f"{out}.{index}", "w") as handle:
        handle.write(run_id or "")


def test_concurrent_claimants_of_one_version_elect_exactly_one(tracking_uri, tmp_path):
    version = uuid.uuid4().hex
    lifecycle.claim(tracking_uri, uuid.uuid4().hex, Policy())  # the store and the ticket roll exist
    _spawn(_claim, tracking_uri, version, time.time() + 8, str(tmp_path / "claim"), count=6)
    won = [r for r in (open(f"{tmp_path / 'claim'}.{i}").read() for i in range(6)) if r]
    assert len(won) == 1, won
    client = registry.connect(tracking_uri)
    runs = client.search_runs([registry.experiment_id(tracking_uri)], f"tags.`{registry.TAG_DATA_VERSION}` = '{version}'")
    assert [r.info.run_id for r in runs] == won  # the losers left no run
    assert [t.tags["run_id"] for t in TicketRoll(tracking_uri).tickets(lifecycle.CLAIM, version)] == won


def _hold_lock(tracking_uri, model, laps, out, index):
    for _ in range(laps):
        with registry.alias_lock(tracking_uri, model):
            entered = time.monotonic()  # one clock for every process on this machine
            time.sleep(0.05)
            with open(out, "a") as log:
                log.write(f"{entered} {time.monotonic()}\n")


def test_the_alias_lock_has_one_holder_at_a_time_and_a_dead_holder_is_passed_over(tracking_uri, tmp_path):
    model, out = f"m-{uuid.uuid4().hex[:8]}", tmp_path / "held.txt"
    _spawn(_hold_lock, tracking_uri, model, 3, out, count=4)
    spans = sorted(tuple(map(float, line.split())) for line in out.read_text().splitlines())
    assert len(spans) == 12 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # never two at once
    assert TicketRoll(tracking_uri).tickets("alias-lock", model) == []  # each released its own

    TicketRoll(tracking_uri).take("alias-lock", model, holder="a process that died holding it")
    with pytest.raises(TimeoutError, match="locked by a process that died"):
        with registry.alias_lock(tracking_uri, model, wait_seconds=1, stale_seconds=60):
            pass
    time.sleep(1.5)
    with registry.alias_lock(tracking_uri, model, wait_seconds=5, stale_seconds=1):
        pass  # the dead holder's ticket is older than the stale age, on the store's clock
