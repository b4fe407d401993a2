"""One writer per output: a lease file in the output (owner, host, pid, heartbeat) held while a job writes.

A second job on the same output is refused with the holder named. A lease whose holder is gone (its process
no longer exists on this host, or its heartbeat is older than the timeout, e.g. a killed driver on another
node) is taken over, with a message. On a local disk the lease is created with O_EXCL (atomic); on object
storage with a conditional put (S3's If-None-Match: *, fsspec's mode="create"), so of two builds started at
once exactly one gets it (filesystems without exclusive creation: written and read back). A takeover re-reads
after a pause, so of two racing takeovers only the last one keeps it (the other sees a foreign token and stops).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from tdastore.errors import StoreError
from tdastore.store.location import StorePath
from tdastore.store.manifest import write_json_atomic

LEASE_FILE = ".lease"
TIMEOUT_S = 60.0  # a heartbeat older than this means the holder is gone
HEARTBEAT_S = 10.0


class Lease:
    """`with Lease(root, "build"):` holds the output for this process; refreshes a heartbeat in a thread."""

    def __init__(self, root: StorePath, job: str, timeout_s: float = TIMEOUT_S, heartbeat_s: float = HEARTBEAT_S):
        self.root, self.job, self.timeout_s, self.heartbeat_s = root, job, timeout_s, heartbeat_s
        self.path = root / LEASE_FILE
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {
            "job": self.job,
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "owner": f"{os.environ.get('USER', 'someone')}@{socket.gethostname()} pid {os.getpid()}",
            "heartbeat": time.time(),
        }

    def acquire(self) -> Lease:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._create():
            holder = self._holder()
            ahead = holder.get("heartbeat", 0) - time.time() if holder is not None else 0.0
            if holder is not None and ahead > self.timeout_s and not self._dead_here(holder):
                raise StoreError(
                    f"the lease file '{self.path}' has a heartbeat {ahead:.0f} s in the future ({holder.get('owner')}"
                    f"): a clock ahead on {holder.get('host')} or a damaged file; if no job is writing '{self.root}', "
                    f"delete '{self.path}' and rerun"
                )
            if holder is not None and not self._stale(holder):
                raise StoreError(
                    f"'{self.root}' is being written by another {holder.get('job', 'job')} ({holder.get('owner')}, "
                    f"heartbeat {time.time() - holder.get('heartbeat', 0):.0f} s ago): wait for it to finish, or "
                    f"if it was killed, rerun after {self.timeout_s:.0f} s (its lease then expires)"
                )
            if holder is not None:
                print(
                    f"taking over the stale lease of '{self.root}' from {holder.get('owner')} (its {holder.get('job')} "
                    "stopped without releasing it)",
                    file=sys.stderr,
                )
            write_json_atomic(self.path, self._record())
            time.sleep(0.05 if isinstance(self.path, Path) else 1.0)  # a racing takeover writes last and wins
            if (self.read() or {}).get("token") != self.token:
                raise StoreError(f"'{self.root}' was taken by another job at the same moment: rerun to resume")
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        """Create the lease if there is none; False if one exists."""
        if isinstance(self.path, Path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                json.dump(self._record(), handle)
            return True
        data = json.dumps(self._record()).encode()
        try:  # a conditional put (S3's If-None-Match: *): exactly one of two racing writers creates it
            self.path.fs.pipe_file(self.path.path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a filesystem without exclusive creation: write, read back
            if self.path.exists():
                return False
            write_json_atomic(self.path, self._record())
            return (self.read() or {}).get("token") == self.token

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def _holder(self) -> dict | None:
        """The lease file's record; None when it vanished. One that stays unreadable (a lease is written whole
        within milliseconds) is damage, reported rather than taken over."""
        for attempt in range(5):
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            try:
                holder = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError):
                holder = None
            if isinstance(holder, dict) and isinstance(holder.get("heartbeat", 0), (int, float)):
                return holder
            time.sleep(0.1 * (attempt + 1))
        raise StoreError(
            f"the lease file '{self.path}' is unreadable (damaged): if no job is writing '{self.root}', delete "
            f"'{self.path}' and rerun"
        )

    def _dead_here(self, holder: dict) -> bool:
        pid = holder.get("pid", -1)
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)

    def _stale(self, holder: dict) -> bool:
        if self._dead_here(holder):
            return True
        return time.time() - holder.get("heartbeat", 0) > self.timeout_s

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if (self.read() or {}).get("token") != self.token:
                return  # taken over: the job finds out at its next write
            write_json_atomic(self.path, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self.read() or {}).get("token") == self.token:
            self.path.unlink()

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
