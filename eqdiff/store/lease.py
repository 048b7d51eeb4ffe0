"""One run per run id at a time: a lease object in the artifact store.

Two runs of one run id at once would race on the same stage markers. So a run first takes the
lease ``runs/{run}/_LEASE.json`` (:func:`eqdiff.store.keys.run_lease`) and keeps renewing it
while it works (:func:`hold_lease`); a second run of that id is refused with
:class:`LeaseHeldError`, which names the holder. A holder that dies stops renewing; once its
lease has expired (``ttl_s`` after the last renewal) the next run takes it over.

The lease is built only on the store's conditional writes
(:meth:`~eqdiff.store.base.ArtifactStore.create_exclusive`,
:meth:`~eqdiff.store.base.ArtifactStore.replace_if`,
:meth:`~eqdiff.store.base.ArtifactStore.delete_if`), so it behaves the same in a local folder
(flock) and on S3 (If-None-Match / If-Match). Its JSON body holds the holder, when it was
acquired, renewed and when it expires (UTC), and a random ``lease_id`` that makes every holder's
writes distinct.

Clocks: the holder stamps the expiry with its clock and other runs compare it with theirs. Hosts
whose clocks disagree by ``d`` seconds may take over a live lease ``d`` seconds early (or honour a
dead one ``d`` seconds late): keep hosts NTP-synchronised and ``ttl_s`` far above any skew.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from eqdiff.store.base import ArtifactStore
from eqdiff.store.errors import ArtifactNotFoundError, PreconditionFailedError, StorageError
from eqdiff.store.keys import validate_key

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 300.0
_ACQUIRE_ATTEMPTS = 5  # each lost race means the lease changed under us: look again


def default_holder(label: str = "") -> str:
    """Who holds a lease: ``user@host pid N``, then ``label`` (e.g. a flow-run id) if given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in a bare container
        user = f"uid {os.getuid()}"
    holder = f"{user}@{socket.gethostname()} pid {os.getpid()}"
    return f"{holder} ({label})" if label else holder


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class LeaseRecord:
    """The body of a lease object."""

    holder: str
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    lease_id: str

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    def to_json(self) -> bytes:
        body = {"holder": self.holder, "acquired_at": _stamp(self.acquired_at),
                "renewed_at": _stamp(self.renewed_at), "expires_at": _stamp(self.expires_at),
                "lease_id": self.lease_id}
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> LeaseRecord:
        try:
            body = json.loads(data)
            return cls(holder=str(body["holder"]),
                       acquired_at=datetime.fromisoformat(body["acquired_at"]),
                       renewed_at=datetime.fromisoformat(body["renewed_at"]),
                       expires_at=datetime.fromisoformat(body["expires_at"]),
                       lease_id=str(body["lease_id"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{where} is not a readable lease ({exc!r}); delete it if no run "
                               f"of this id is going on") from exc


class LeaseHeldError(StorageError):
    """Another holder has the lease and it has not expired."""

    def __init__(self, where: str, record: LeaseRecord) -> None:
        self.record = record
        super().__init__(
            f"{where} is held by {record.holder}: taken at {_stamp(record.acquired_at)}, last "
            f"renewed at {_stamp(record.renewed_at)}, expires at {_stamp(record.expires_at)} "
            f"(UTC) unless renewed again. Wait for that run to end (or for the lease to expire "
            f"if the holder died), or use another run id; if you are sure the holder is dead, "
            f"delete {where} and retry.")


class LeaseLostError(StorageError):
    """Our lease was taken over (after it expired) or deleted: stop writing to the run."""


class RunLease:
    """One would-be holder's handle on the lease at ``key``; safe to use from several threads."""

    def __init__(self, store: ArtifactStore, key: str, holder: str, *,
                 ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.store = store
        self.key = validate_key(key)
        self.holder = holder
        self.ttl_s = ttl_s
        self.where = f"{store.url.rstrip('/')}/{self.key}"
        self._mutex = threading.Lock()
        self._record: LeaseRecord | None = None
        self._token: str | None = None
        self._taken_over = False

    @property
    def record(self) -> LeaseRecord | None:
        """The lease as we last wrote it, while we hold it."""
        with self._mutex:
            return self._record if self._token is not None else None

    @property
    def lost(self) -> bool:
        """True once the lease stopped being safely ours while we meant to hold it: another
        holder took it over, or our own expiry passed without a renewal (another run may take it
        over at any moment). Check it before committing work, e.g. before a stage marker."""
        with self._mutex:
            if self._taken_over:
                return True
            return (self._token is not None and self._record is not None
                    and self._record.expired(_now()))

    def acquire(self) -> LeaseRecord:
        """Take the lease: create it, or take it over if it has expired.

        Raises :class:`LeaseHeldError` when another holder's lease is still live.
        """
        lease_id = uuid.uuid4().hex
        for _ in range(_ACQUIRE_ATTEMPTS):
            now = _now()
            mine = LeaseRecord(self.holder, now, now, now + timedelta(seconds=self.ttl_s),
                               lease_id)
            try:
                return self._hold(mine, self.store.create_exclusive(self.key, mine.to_json()))
            except PreconditionFailedError:
                pass
            current = self._read()
            if current is None:
                continue  # released in the meantime: create it again
            theirs, token = current
            if theirs.lease_id == lease_id:  # our write landed but its reply was lost
                return self._hold(theirs, token)
            if not theirs.expired(_now()):
                raise LeaseHeldError(self.where, theirs)
            try:
                token = self.store.replace_if(self.key, mine.to_json(), token)
            except PreconditionFailedError:
                continue  # another run moved first: look again
            logger.warning("%s: took over the lease of %s, which expired at %s UTC", self.where,
                           theirs.holder, _stamp(theirs.expires_at))
            return self._hold(mine, token)
        raise StorageError(f"{self.where}: the lease changed {_ACQUIRE_ATTEMPTS} times while we "
                           f"tried to take it (other runs are racing for it); retry later")

    def renew(self) -> LeaseRecord:
        """Push our expiry to ``ttl_s`` from now; :class:`LeaseLostError` if no longer ours."""
        with self._mutex:
            if self._record is None or self._token is None:
                raise LeaseLostError(f"{self.where}: {self.holder} does not hold this lease")
            now = _now()
            renewed = replace(self._record, renewed_at=now,
                              expires_at=now + timedelta(seconds=self.ttl_s))
            try:
                self._token = self.store.replace_if(self.key, renewed.to_json(), self._token)
            except PreconditionFailedError:
                current = self._read()
                if current is not None and current[0].lease_id == renewed.lease_id:
                    self._record, self._token = current  # our write landed, its reply was lost
                    return current[0]
                self._token, self._taken_over = None, True
                now_held = (f"now held by {current[0].holder}" if current is not None
                            else "it was deleted")
                raise LeaseLostError(f"{self.where} is no longer held by {self.holder}: "
                                     f"{now_held}") from None
            self._record = renewed
            return renewed

    def release(self) -> bool:
        """Delete the lease if it is still ours, never someone else's.

        False when we did not hold it, or another holder has it now (it is left in place).
        """
        with self._mutex:
            if self._token is None:
                return False
            try:
                self.store.delete_if(self.key, self._token)
            except PreconditionFailedError:
                self._token = None
                current = self._read()
                if current is None:
                    logger.debug("%s: already gone at release", self.where)
                    return True
                self._taken_over = True
                logger.warning("%s: not released: it is now held by %s, not %s", self.where,
                               current[0].holder, self.holder)
                return False
            self._token = None
        logger.info("%s: released by %s", self.where, self.holder)
        return True

    def _hold(self, record: LeaseRecord, token: str) -> LeaseRecord:
        with self._mutex:
            self._record, self._token, self._taken_over = record, token, False
        logger.info("%s: held by %s until %s UTC", self.where, record.holder,
                    _stamp(record.expires_at))
        return record

    def _read(self) -> tuple[LeaseRecord, str] | None:
        try:
            data, token = self.store.get_with_token(self.key)
        except ArtifactNotFoundError:
            return None
        return LeaseRecord.from_json(data, self.where), token


def _keep_renewed(lease: RunLease, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            lease.renew()
        except LeaseLostError as exc:
            logger.error("%s; stop writing to this run", exc)
            return
        except StorageError as exc:
            logger.error("%s: renewing the lease failed, retrying in %.0f s: %s", lease.where,
                         every_s, exc)


@contextmanager
def hold_lease(store: ArtifactStore, key: str, holder: str, *, ttl_s: float = DEFAULT_TTL_S,
               renew_every_s: float | None = None) -> Iterator[RunLease]:
    """Acquire the lease at ``key``, renew it from a daemon thread, release it on exit.

    Renews every ``renew_every_s`` seconds (default ``ttl_s / 3``). A failed renewal is logged
    as an error and retried at the next tick; once the lease is taken over, or our expiry passes
    without a renewal, ``lease.lost`` is true: check it before committing work. Raises
    :class:`LeaseHeldError` at entry if another holder's lease is live.
    """
    every_s = ttl_s / 3 if renew_every_s is None else renew_every_s
    if not 0 < every_s < ttl_s:
        raise ValueError(f"renew_every_s must be between 0 and ttl_s ({ttl_s}), got {every_s}")
    lease = RunLease(store, key, holder, ttl_s=ttl_s)
    lease.acquire()
    stop = threading.Event()
    renewer = threading.Thread(target=_keep_renewed, args=(lease, stop, every_s),
                               name=f"lease-renewer {key}", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        try:
            lease.release()
        except StorageError as exc:
            logger.error("%s: could not release the lease (%s); it expires on its own within "
                         "%.0f s", lease.where, exc, lease.ttl_s)
