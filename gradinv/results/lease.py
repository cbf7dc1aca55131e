"""One driver at a time writes a remote results location: a lease object, refreshed while the driver lives.

A local directory has an OS file lock, released when its holder dies; object storage has none, so the
writer holds ``_gradinv.lease`` (readers skip '_' names): JSON with its owner (host, pid, a random id)
and an expiry, rewritten by a heartbeat thread every third of the lease. Another driver may take the
lease once it has expired, or at once when its holder ran on the same host and that process is gone
(SIGKILL, the out-of-memory killer). A live holder's lease refuses the second driver in one line.

Limits: pyarrow offers no conditional write (compare-and-swap) on S3, so taking a lease is
read, write, wait ``SETTLE`` seconds, read back. Two drivers that both read a free lease and write it
within less than ``SETTLE`` of each other are told apart (the later write wins and the earlier writer
sees it); one whose read and write lie further apart than that from the other's can still both
proceed. Before each batch the writer reads the lease back and stops (its rows kept in its journal)
when another owner holds it. Expiry compares wall clocks of different hosts: keep them in sync (NTP).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from gradinv.errors import ConfigError

from .location import FLAG, Location

LEASE_NAME = "_gradinv.lease"
SECONDS_ENV = "GRADINV_LEASE_SECONDS"
DEFAULT_SECONDS = 60.0
SETTLE = 0.2


class Lease:
    def __init__(self, location: Location):
        self.location = location
        self.seconds = float(os.environ.get(SECONDS_ENV) or DEFAULT_SECONDS)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease or raise ConfigError naming its holder; OSError: the endpoint failed."""
        held = self.read()
        if held is not None and not self._takeable(held):
            raise self._refusal(held)
        self._write()
        time.sleep(SETTLE)  # a driver that read the same free lease writes within this window
        held = self.read()
        if held is None or held.get("owner") != self.owner:
            raise self._refusal(held or {"owner": "unknown"})
        self._thread = threading.Thread(target=self._heartbeat, name="gradinv-lease", daemon=True)
        self._thread.start()

    def verify(self) -> None:
        """Raise OSError unless this driver still holds the lease (before writing a batch)."""
        held = self.read()
        if held is None or held.get("owner") != self.owner:
            holder = (held or {}).get("owner", "nobody")
            raise OSError(f"the lease on {self.location.uri} is held by {holder}, not this driver")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = self.read()
            if held is not None and held.get("owner") == self.owner:
                self.location.delete(LEASE_NAME)
        except OSError:  # the endpoint went away: the lease expires by itself
            pass

    def read(self) -> dict | None:
        try:
            return json.loads(self.location.read_bytes(LEASE_NAME))
        except FileNotFoundError:
            return None
        except ValueError:  # not JSON: not a lease anyone can hold
            return {"owner": "unreadable", "expires": 0}

    def _write(self) -> None:
        lease = {"owner": self.owner, "host": self.host, "pid": self.pid, "expires": time.time() + self.seconds}
        self.location.put(LEASE_NAME, json.dumps(lease).encode())

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                held = self.read()
                if held is not None and held.get("owner") != self.owner:
                    return  # taken over (ours expired): verify() stops the next batch
                self._write()
            except OSError:  # the endpoint is down for now: try again next beat
                pass

    def _takeable(self, held: dict) -> bool:
        if held.get("owner") == self.owner or float(held.get("expires", 0)) < time.time():
            return True
        return held.get("host") == self.host and not _alive(int(held.get("pid", -1)))

    def _refusal(self, held: dict) -> ConfigError:
        expires = held.get("expires")
        until = datetime.fromtimestamp(float(expires), timezone.utc).strftime("%H:%M:%S UTC") if expires else "?"
        return ConfigError(
            FLAG,
            self.location.uri,
            f"another gradinv driver ({held.get('owner')}) is writing there (lease until {until}, renewed while "
            f"it runs); wait for it to finish, or name another --results",
        )


def _alive(pid: int) -> bool:
    """Whether a process of that id runs on this host (a zombie, killed but not reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
