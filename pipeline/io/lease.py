"""One run at a time on an output path: a run holds the path by a lease file it creates
exclusively (where the filesystem can: local disks, and object stores with conditional
writes) and refreshes while it runs. A second run finds a live lease and stops, naming the
holder; a lease whose holder stopped refreshing it (a crashed run) expires and is taken over, at once where the
holder was a process on this host that has ended."""

import json
import os
import socket
import threading
import time
import uuid

import fsspec

from pipeline.errors import JobError

LEASE = "_kvrelay_lease.json"
HEARTBEAT_S = 10.0
EXPIRES_S = 60.0  # six missed heartbeats: the holder is gone


class OutputLease:
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str):
        self.fs, self.path, self.url = fs, f"{root}/{LEASE}", url
        self.holder = {
            "run": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="kvrelay-lease")

    def acquire(self) -> "OutputLease":
        """Takes the lease, or raises naming the run that holds it; `with` the lease releases it."""
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if not self._create():
            held = self.read()
            age = time.time() - held.get("heartbeat", 0) if held else EXPIRES_S
            if age < EXPIRES_S and not _gone(held):
                raise JobError(
                    f"output.path {self.url} is in use by another run (host {held.get('host')}, pid {held.get('pid')}, "
                    f"refreshed {age:.0f} s ago); wait for it to finish, or rerun once it has stopped "
                    f"(its lease expires {EXPIRES_S:.0f} s after its last refresh)"
                )
            self.fs.rm_file(self.path)  # its run is gone
            if not self._create():
                raise JobError(f"output.path {self.url} was just taken by another run; rerun later")
        self._thread.start()
        return self

    def __enter__(self) -> "OutputLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if (self.read() or {}).get("run") == self.holder["run"]:
            self.fs.rm_file(self.path)

    def read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):  # gone, or caught half written
            return None

    def _create(self) -> bool:
        """Writes the lease only if there is none; False if another run holds one."""
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(self._content())
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # a store without exclusive creation: best effort
            if self.fs.exists(self.path):
                return False
            self._write()
        return True

    def _write(self) -> None:
        with self.fs.open(self.path, "wb") as f:
            f.write(self._content())

    def _content(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": time.time()}).encode()

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()


def _gone(holder: dict) -> bool:
    """A holder on this host whose process has ended (a killed run): no need to wait for expiry."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False
