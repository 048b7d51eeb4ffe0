"""The run lease and the conditional writes under it, on both backends (local folder, moto S3)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from eqdiff.store import ArtifactStore, PreconditionFailedError, open_store
from eqdiff.store.keys import run_lease
from eqdiff.store.lease import (
    LeaseHeldError,
    LeaseLostError,
    RunLease,
    default_holder,
    hold_lease,
)

KEY = run_lease("r1")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return open_store(str(tmp_path / "artifacts"))
    bucket_url = request.getfixturevalue("s3_bucket_url")
    return open_store(f"{bucket_url}/team", endpoint_url=request.getfixturevalue("s3_endpoint"),
                      cache_dir=str(tmp_path / "s3-cache"))


def _holder_in_store(store: ArtifactStore) -> str:
    return json.loads(store.get_bytes(KEY))["holder"]


# --------------------------------------------------------------------------- conditional writes

def test_create_exclusive_creates_once(store: ArtifactStore) -> None:
    token = store.create_exclusive("a/b.json", b"first")
    assert store.get_with_token("a/b.json") == (b"first", token)
    with pytest.raises(PreconditionFailedError, match="a/b.json"):
        store.create_exclusive("a/b.json", b"second")
    assert store.get_bytes("a/b.json") == b"first"  # an ordinary, checksum-verified object
    assert store.list_keys("a") == ["a/b.json"]  # no lock files or temp files listed


def test_replace_if_needs_the_current_token(store: ArtifactStore) -> None:
    first = store.create_exclusive("k.json", b"one")
    second = store.replace_if("k.json", b"two", first)
    assert second != first
    with pytest.raises(PreconditionFailedError):
        store.replace_if("k.json", b"three", first)
    assert store.get_with_token("k.json") == (b"two", second)
    with pytest.raises(PreconditionFailedError):
        store.replace_if("missing.json", b"x", second)
    assert not store.exists("missing.json")


def test_delete_if_needs_the_current_token(store: ArtifactStore) -> None:
    first = store.create_exclusive("k.json", b"one")
    second = store.replace_if("k.json", b"two", first)
    with pytest.raises(PreconditionFailedError):
        store.delete_if("k.json", first)
    assert store.exists("k.json")
    store.delete_if("k.json", second)
    assert not store.exists("k.json")
    with pytest.raises(PreconditionFailedError):
        store.delete_if("k.json", second)
    store.create_exclusive("k.json", b"again")  # a deleted key can be created anew


# --------------------------------------------------------------------------- the lease

def test_second_acquire_is_refused_naming_the_holder(store: ArtifactStore) -> None:
    RunLease(store, KEY, "alice@gpu1 pid 7").acquire()
    with pytest.raises(LeaseHeldError) as refused:
        RunLease(store, KEY, "bob@gpu2 pid 9").acquire()
    message = str(refused.value)
    for part in ("alice@gpu1 pid 7", "runs/r1/_LEASE.json", "expires at", "another run id",
                 "delete"):
        assert part in message
    assert refused.value.record.holder == "alice@gpu1 pid 7"
    assert _holder_in_store(store) == "alice@gpu1 pid 7"


def test_an_expired_lease_is_taken_over(store: ArtifactStore,
                                        caplog: pytest.LogCaptureFixture) -> None:
    RunLease(store, KEY, "alice", ttl_s=0.2).acquire()
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="eqdiff.store.lease"):
        record = RunLease(store, KEY, "bob").acquire()
    assert record.holder == "bob" == _holder_in_store(store)
    assert "took over the lease of alice" in caplog.text


def test_renew_extends_the_expiry(store: ArtifactStore) -> None:
    lease = RunLease(store, KEY, "alice", ttl_s=60)
    taken = lease.acquire()
    time.sleep(0.05)
    renewed = lease.renew()
    assert renewed.expires_at > taken.expires_at
    assert renewed.acquired_at == taken.acquired_at
    stored = json.loads(store.get_bytes(KEY))
    assert stored["expires_at"] == renewed.expires_at.isoformat(timespec="milliseconds")


def test_release_then_acquire_again(store: ArtifactStore) -> None:
    lease = RunLease(store, KEY, "alice")
    lease.acquire()
    assert lease.release()
    assert not store.exists(KEY)
    assert not lease.release()  # nothing left to release
    RunLease(store, KEY, "bob").acquire()
    assert _holder_in_store(store) == "bob"


def test_the_old_holder_cannot_renew_or_release_a_taken_over_lease(
        store: ArtifactStore) -> None:
    alice = RunLease(store, KEY, "alice", ttl_s=0.2)
    alice.acquire()
    time.sleep(0.3)
    assert alice.lost  # expired without a renewal
    bob = RunLease(store, KEY, "bob")
    bob.acquire()
    with pytest.raises(LeaseLostError, match="now held by bob"):
        alice.renew()
    assert alice.lost
    assert not alice.release()
    assert _holder_in_store(store) == "bob"
    bob.renew()
    assert not bob.lost


@pytest.mark.parametrize("existing", ["none", "expired"])
def test_racing_acquirers_exactly_one_wins(store: ArtifactStore, existing: str) -> None:
    if existing == "expired":
        RunLease(store, KEY, "ghost", ttl_s=0.1).acquire()
        time.sleep(0.2)
    contenders = 8
    start = threading.Barrier(contenders)
    outcomes: dict[str, str] = {}

    def contend(name: str) -> None:
        lease = RunLease(store, KEY, name)
        start.wait()
        try:
            lease.acquire()
            outcomes[name] = "won"
        except LeaseHeldError:
            outcomes[name] = "refused"

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [name for name, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == contenders
    assert len(winners) == 1, outcomes
    assert _holder_in_store(store) == winners[0]


def test_hold_lease_renews_in_the_background(store: ArtifactStore) -> None:
    with hold_lease(store, KEY, "alice", ttl_s=1.5, renew_every_s=0.5) as lease:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # well past the first expiry
            with pytest.raises(LeaseHeldError, match="alice"):
                RunLease(store, KEY, "bob").acquire()
            time.sleep(0.5)
        assert not lease.lost
    assert not store.exists(KEY)


def test_hold_lease_releases_when_the_block_fails(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError, match="boom"), hold_lease(store, KEY, "alice", ttl_s=30):
        raise RuntimeError("boom")
    assert not store.exists(KEY)


def test_lease_key_and_default_holder() -> None:
    assert run_lease("red toy") == "runs/red%20toy/_LEASE.json"
    holder = default_holder("flow run 1234")
    assert f"pid {os.getpid()}" in holder
    assert holder.endswith("(flow run 1234)")
    assert "@" in default_holder()
