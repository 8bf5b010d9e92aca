"""The writer lock of a store: one writer at a time, found out before any data is written.

Local stores use an ``flock`` on ``STORE/.writer.lock`` (released by the kernel when the
writer dies, even on SIGKILL). Object stores have neither locks nor rename, so the lock is a
*lease object* ``STORE/.writer.lock``: JSON naming its owner and an expiry time, created
with a conditional PUT (S3 ``If-None-Match: *``: exactly one of two racing writers creates
it) and renewed by a heartbeat thread. A writer killed without releasing its lease blocks
others until the lease expires (:data:`DEFAULT_LEASE_S`); ``--break-lock`` removes it at
once. A writer that finds its lease taken over stops before writing its next chunk.

Every lock has an *owner token* ``host:pid:random``; the ranks of a distributed harvest
attach to the store under rank 0's lock by checking that token.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from masksae.errors import StoreError
from masksae.storage.location import StoreLocation

log = logging.getLogger(__name__)

LOCK_FILE = ".writer.lock"
DEFAULT_LEASE_S = 60.0
"""Lifetime of a remote writer lease; renewed every third of it while the writer runs."""
_TAKEOVER_SETTLE_S = 2.0


def new_owner_token() -> str:
    """``host:pid:random``: unique per lock taken."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class WriterLock:
    """A held writer lock; :meth:`release` it when done."""

    owner: str
    """Owner token of this lock."""

    def check(self) -> None:
        """Raise StoreError if the lock was lost (remote leases only)."""

    def release(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------- local: flock
_HELD_LOCAL: dict[str, _LocalLock] = {}  # store realpath -> lock held by this process


class _LocalLock(WriterLock):
    def __init__(self, key: str, handle: Any, owner: str) -> None:
        self.key = key
        self.handle = handle
        self.owner = owner
        self.users = 1

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and _HELD_LOCAL.get(self.key) is self:
            del _HELD_LOCAL[self.key]
            self.handle.close()


def _acquire_local(path: Path, break_lock: bool) -> WriterLock:
    import fcntl

    key = os.path.realpath(path)
    held = _HELD_LOCAL.get(key)
    if held is not None:
        # a writer of this process was abandoned (e.g. after an exception): share its lock
        log.warning("store %s is already open for writing in this process; reusing its lock", path)
        held.users += 1
        return held
    handle = open(Path(path) / LOCK_FILE, "a+")  # noqa: SIM115 - held for the writer's life
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        fields = _parse_local(handle.read())
        handle.close()
        holder = f"pid {fields.get('pid', '?')}"
        if fields.get("owner"):
            holder += f" ({fields['owner']})"
        extra = (
            " (--break-lock does not apply to a local store: its lock is released the moment "
            "its writer dies, so this writer is alive)"
            if break_lock
            else ""
        )
        raise StoreError(
            f"store {path} is being written by {holder}: wait for it to finish, or stop it "
            f"and rerun (a killed writer releases the lock){extra}"
        ) from None
    owner = new_owner_token()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\nowner {owner}\n")
    handle.flush()
    lock = _LocalLock(key, handle, owner)
    _HELD_LOCAL[key] = lock
    return lock


def _parse_local(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        fields[key] = value.strip()
    return fields


def _local_holder(path: Path) -> str | None:
    import fcntl

    lock_path = Path(path) / LOCK_FILE
    if not lock_path.is_file():
        return None
    key = os.path.realpath(path)
    if key in _HELD_LOCAL:
        return _HELD_LOCAL[key].owner
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held exclusively: read the holder's token
            handle.seek(0)
            return _parse_local(handle.read()).get("owner") or "unknown"
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return None


# ---------------------------------------------------------------------------- remote: lease
_HELD_LEASES: dict[str, _Lease] = {}  # store URL -> lease held by this process


class _Lease(WriterLock):
    """A lease object renewed by a daemon thread."""

    def __init__(self, loc: StoreLocation, owner: str, lease_s: float) -> None:
        self.loc = loc
        self.owner = owner
        self.lease_s = lease_s
        self.users = 1
        self.expires_at = time.time() + lease_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"masksae-lease:{loc.name}", daemon=True
        )
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            if not self._heartbeat_once():
                return

    def _heartbeat_once(self) -> bool:
        """Renew the lease; False (and ``lost`` set) once it is lost for good."""
        try:
            current = read_lease(self.loc)
            if current is None or current.get("owner") != self.owner:
                who = "nobody" if current is None else current.get("owner")
                self.lost = f"its writer lease was removed or taken over (now held by {who})"
                return False
            body = lease_body(self.owner, self.lease_s)
            self.loc.write_bytes(LOCK_FILE, body)
            self.expires_at = json.loads(body)["expires_at"]
        except Exception as exc:  # noqa: BLE001 - network trouble: retry until expiry
            log.warning("renewing the writer lease of %s failed: %s", self.loc, exc)
            if time.time() > self.expires_at:
                self.lost = f"its writer lease expired while it could not be renewed ({exc})"
                return False
        return True

    def check(self) -> None:
        if self.lost is not None:
            raise StoreError(
                f"store {self.loc} lost its writer lock: {self.lost}. Another writer may be "
                "running; this one stops here (its completed chunks are kept). Rerun once the "
                "other writer is done"
            )

    def release(self) -> None:
        self.users -= 1
        if self.users > 0 or _HELD_LEASES.get(self.loc.url) is not self:
            return
        del _HELD_LEASES[self.loc.url]
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            current = read_lease(self.loc)
            if current is not None and current.get("owner") == self.owner:
                self.loc.delete(LOCK_FILE)
        except Exception as exc:  # noqa: BLE001 - it will expire on its own
            log.warning("could not remove the writer lease of %s: %s", self.loc, exc)


def lease_body(owner: str, lease_s: float) -> bytes:
    """The JSON of a lease object renewed now."""
    now = time.time()
    return json.dumps(
        {
            "owner": owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed_at": now,
            "expires_at": now + lease_s,
            "lease_seconds": lease_s,
        }
    ).encode()


def read_lease(loc: StoreLocation) -> dict[str, Any] | None:
    """The lease object of a remote store, or None when there is none."""
    try:
        return json.loads(loc.read_bytes(LOCK_FILE))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"owner": "unreadable lease object", "expires_at": 0.0}


def _acquire_lease(loc: StoreLocation, break_lock: bool, lease_s: float) -> WriterLock:
    held = _HELD_LEASES.get(loc.url)
    if held is not None and held.lost is None:
        log.warning("store %s is already open for writing in this process; reusing its lease", loc)
        held.users += 1
        return held
    took_over = False
    for _attempt in range(5):
        owner = new_owner_token()
        if loc.create_exclusive(LOCK_FILE, lease_body(owner, lease_s)):
            if took_over:
                # a second writer that read the same stale lease may delete ours right after
                # we created it (deletes are unconditional): settle, then confirm ownership
                time.sleep(_TAKEOVER_SETTLE_S)
            current = read_lease(loc)
            if current is not None and current.get("owner") == owner:
                lock = _Lease(loc, owner, lease_s)
                _HELD_LEASES[loc.url] = lock
                return lock
            continue  # lost a race on a filesystem without conditional writes
        current = read_lease(loc)
        if current is None:
            continue  # released in between: try again
        holder = current.get("owner", "unknown")
        remaining = float(current.get("expires_at", 0.0)) - time.time()
        if break_lock:
            log.warning("--break-lock: removing the writer lease of %s held by %s", loc, holder)
        elif remaining <= 0:
            log.warning(
                "taking over the writer lease of %s: its holder %s stopped renewing it "
                "%.0f s ago (presumed dead)",
                loc,
                holder,
                -remaining,
            )
        else:
            raise StoreError(
                f"store {loc} is being written by {holder} (its lease expires in "
                f"{remaining:.0f} s unless renewed): wait for it to finish; if that writer is "
                f"dead, wait {remaining:.0f} s or rerun with --break-lock"
            )
        loc.delete(LOCK_FILE)
        took_over = True
        break_lock = False  # break one lease, not every lease a new writer takes meanwhile
    raise StoreError(
        f"could not take the writer lock of store {loc}: other writers keep taking it; "
        "make sure only one harvest writes this store, then rerun"
    )


# ---------------------------------------------------------------------------- public
def acquire(
    loc: StoreLocation, *, break_lock: bool = False, lease_s: float = DEFAULT_LEASE_S
) -> WriterLock:
    """Take the writer lock of the store at ``loc``; StoreError naming the holder if taken.

    Within one process a second writer of the same store shares the lock (the first one is
    presumed abandoned, as after an exception).
    """
    if loc.local_path is not None:
        return _acquire_local(loc.local_path, break_lock)
    return _acquire_lease(loc, break_lock, lease_s)


def holder(loc: StoreLocation) -> str | None:
    """Owner token of the live writer lock of ``loc``, or None when nobody holds it."""
    if loc.local_path is not None:
        return _local_holder(loc.local_path)
    held = _HELD_LEASES.get(loc.url)
    if held is not None and held.lost is None:
        return held.owner
    lease = read_lease(loc)
    if lease is None or float(lease.get("expires_at", 0.0)) < time.time():
        return None
    return lease.get("owner")
