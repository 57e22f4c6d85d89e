"""One run at a time on an output path: a run holds the path by a lease file it creates
exclusively (where the filesystem can: local disks, and object stores with conditional
writes) and refreshes while it runs. A second run finds a live lease and stops, naming the
holder; a lease whose holder stopped refreshing it (a crashed run) expires and is taken over, at
once where the holder was a process of this machine's process space that has ended.

Expiry is judged by the storage's modification time of the lease, not by a clock of the holder's
own. Before each refresh the holder checks that the lease still names it: one that finds another
run's (taken over while it could not refresh, from a machine whose clock is far ahead) has lost
the path, and its run stops before committing anything more (`check`). A refresh that fails is
tried again within seconds; a holder that cannot refresh for most of the expiry time gives the
lease up the same way, since another run may take it over."""

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import fsspec

from pipeline.errors import JobUnfinished
from pipeline.io.storage import aside

log = logging.getLogger(__name__)

LEASE = "_kvrelay_lease.json"
HEARTBEAT_S = 10.0
RETRY_S = 1.0  # after a refresh that failed
EXPIRES_S = 60.0  # six missed heartbeats: the holder is gone


class OutputLease:
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str):
        self.fs, self.root, self.path, self.url = fs, root, f"{root}/{LEASE}", url
        self.holder = {
            "run": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_space": process_space(),
            "started": time.time(),
        }
        self.lost: str | None = None  # why this run no longer holds the path
        self._refreshed = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="kvrelay-lease")

    def acquire(self) -> "OutputLease":
        """Takes the lease, or raises naming the run that holds it; `with` the lease releases it."""
        self.fs.makedirs(self.root, exist_ok=True)
        if not self._create():
            held, age = self.read(), self.age()
            if held and age < EXPIRES_S and not _gone(held):
                raise JobUnfinished(
                    f"output.path {self.url} is in use by another run (host {held.get('host')}, pid {held.get('pid')}, "
                    f"refreshed {age:.0f} s ago); wait for it to finish, or rerun once it has stopped "
                    f"(its lease expires {EXPIRES_S:.0f} s after its last refresh)"
                )
            self.fs.rm_file(self.path)  # its run is gone
            if not self._create():
                raise JobUnfinished(f"output.path {self.url} was just taken by another run; rerun later")
        self._refreshed = time.monotonic()
        self._thread.start()
        return self

    def __enter__(self) -> "OutputLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> None:
        """Raises if this run has lost the path: nothing may be committed after."""
        if self.lost:
            raise JobUnfinished(
                f"output.path {self.url}: {self.lost}; this run stopped and committed nothing after. Rerun "
                "once the other run has stopped: committed shards are kept"
            )

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

    def age(self) -> float:
        """Seconds since the lease was last written, by the storage's clock where it keeps one."""
        try:
            written = self.fs.modified(self.path).timestamp()
        except (NotImplementedError, OSError):
            written = (self.read() or {}).get("heartbeat", 0)
        return time.time() - written

    def refresh(self) -> None:
        """One heartbeat: rewrites the lease if it still names this run; else the run has lost it."""
        held = self.read()
        if (held or {}).get("run") != self.holder["run"]:
            self.lost = (
                f"its lease was taken over by another run (host {held.get('host')}, pid {held.get('pid')})"
                if held
                else "its lease was removed by another run"
            )
            return
        self._write()
        self._refreshed = time.monotonic()

    def _heartbeat(self) -> None:
        wait = HEARTBEAT_S
        while not self._stop.wait(wait) and not self.lost:
            try:
                self.refresh()
                wait = HEARTBEAT_S
            except Exception as error:  # the storage, now and then: tried again soon
                stale = time.monotonic() - self._refreshed
                log.warning("could not refresh the lease on %s (%r); trying again", self.url, error)
                if stale > EXPIRES_S - HEARTBEAT_S:
                    self.lost = f"its lease could not be refreshed for {stale:.0f} s ({error!r})"
                wait = RETRY_S

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
        """Written aside and moved into place: a reader never finds it half written."""
        written = aside(self.path)
        with self.fs.open(written, "wb") as f:
            f.write(self._content())
        self.fs.mv(written, self.path)

    def _content(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": time.time()}).encode()


def process_space() -> str:
    """What a pid is a process of: this host, since its last boot, in this PID namespace (two
    containers may share a host name, and pids, but not a namespace)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: the host name alone
        boot = namespace = ""
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _gone(holder: dict) -> bool:
    """A holder in this process space whose process has ended (a killed run): no need to wait
    for expiry."""
    if holder.get("process_space") != process_space():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False
