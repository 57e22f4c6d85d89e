"""kv.transport=storage: payload bytes in files under one root URL, the payload column keeping
only the file's name and checksum. For payloads too large for the object store, and for
handing KV to a decode job that runs elsewhere or later.

Names come from data (a prefill dataset may come from anywhere), so only names of the form
kvrelay writes are accepted: a file can never be read or removed outside the root.

Shared storage fails now and then (a throttled or dropped request, a timeout): a read is tried
again a few times, waiting longer each time, before its row is given up as lost.

A job folder is one job's: its rows' payload files and, under `blocks/`, the shared blocks they
name. A prefill dataset's folder outlives the prefill job, and its blocks go only once no payload
file in it is left to name them (`remove_spent_blocks`)."""

import re
import time
import uuid
from dataclasses import replace
from typing import Callable, TypeVar

import fsspec
import numpy as np

from pipeline.columns import ErrorKind
from pipeline.kv.payload import KVPayload, PayloadLost, PayloadMismatch

T = TypeVar("T")

# A payload file, or a shared block: its hash (SHA-256; XXH3-128 in payload format 3) and checksum.
_NAME = re.compile(r"[0-9a-f]{16}/([0-9a-f]{32}|blocks/([0-9a-f]{64}|[0-9a-f]{32})[0-9a-f]{16})\.kv")
_ASIDE = ".partial-"  # a block being written, renamed into place once whole
RETRIES = 3  # tries after the first
BACKOFF_S = 0.1  # the wait before the first retry, doubled before each next
# Errors that the same call will meet again: not retried. fsspec's object stores raise these for
# 404 and 403, and a plain OSError for the rest (throttling, 5xx).
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class PayloadStore:
    def __init__(self, url: str, job: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.url = url
        self.job = job  # this job's folder under the root

    def put(self, payload: KVPayload) -> KVPayload:
        """Writes the payload's bytes to a new file; returns the payload naming it."""
        name = self._write(f"{self.job}/{uuid.uuid4().hex}.kv", payload.data)
        return replace(payload, data=np.empty(0, np.uint8), file=name)

    def fetch(self, payload: KVPayload) -> KVPayload:
        """The payload (one that passed `KVPayload.check`) with its file's bytes; a file of
        another size than the payload's shape and codec make is not read."""
        path = self._path(payload.file)
        try:
            size = _retried(self.fs.size, path)
            if size is not None and size != payload.nbytes:  # None: the filesystem cannot tell
                raise PayloadLost(
                    ErrorKind.kv_corrupt,
                    f"KV payload file {payload.file} has {size} bytes; its shape and codec make {payload.nbytes}",
                )
            data = _retried(self.fs.cat_file, path)
        except FileNotFoundError:
            raise PayloadLost(
                ErrorKind.kv_missing, f"KV payload file {payload.file} is missing from {self.url}"
            ) from None
        except OSError as error:
            raise PayloadLost(
                ErrorKind.kv_unreadable, f"KV payload file {payload.file} in {self.url}: {error!r}"
            ) from None
        return replace(payload, data=np.frombuffer(data, np.uint8))

    def put_block(self, key: str, data: np.ndarray) -> None:
        """A shared block's bytes (pipeline/kv/blocks.py), in this job's folder. Decode workers
        may be reading a block while another prefill worker stores it too: a block in place is
        left as it is (its name is its content), and a new one is written aside and renamed, so
        that no reader ever sees part of one."""
        path = self._path(f"{self.job}/blocks/{key}.kv")
        if self.fs.exists(path):
            return
        aside = f"{path}{_ASIDE}{uuid.uuid4().hex}"
        self._write_path(aside, data)
        self.fs.mv(aside, path)

    def fetch_block(self, folder: str | None, key: str) -> np.ndarray | None:
        """A shared block's bytes from the job folder `folder`; None when it cannot be read (or
        named: the folder comes from a payload's file name, not yet checked)."""
        try:
            return np.frombuffer(_retried(self.fs.cat_file, self._path(f"{folder}/blocks/{key}.kv")), np.uint8)
        except (OSError, PayloadMismatch):
            return None

    def remove(self, names: list[str | None]) -> None:
        for path in (self._path(n) for n in names if n):
            if self.fs.exists(path):
                self.fs.rm_file(path)

    def remove_spent_blocks(self, names: list[str | None]) -> list[str]:
        """The job folders these payload files are in, with their shared blocks, where no
        payload file is left: every row that could name a block is decoded and its file
        removed. A folder that still holds one (a row not decoded yet, or one whose payload
        failed its checks) keeps its blocks. Returns the folders removed."""
        self.fs.invalidate_cache()  # the commit tasks removed files: a cached listing (s3fs) is stale
        removed = []
        for folder in sorted({name.split("/")[0] for name in names if name and _NAME.fullmatch(name)}):
            path = f"{self.root}/{folder}"
            entries = self.fs.ls(path, detail=False) if self.fs.isdir(path) else []
            if entries and not any(entry.rstrip("/").endswith(".kv") for entry in entries):
                self.fs.rm(path, recursive=True)
                removed.append(folder)
        return removed

    def remove_job(self) -> None:
        """This job's folder, with whatever a crashed run of it left behind."""
        if self.fs.exists(f"{self.root}/{self.job}"):
            self.fs.rm(f"{self.root}/{self.job}", recursive=True)

    def _write(self, name: str, data: np.ndarray) -> str:
        self._write_path(self._path(name), data)
        return name

    def _write_path(self, path: str, data: np.ndarray) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(memoryview(data))

    def _path(self, name: str) -> str:
        if not _NAME.fullmatch(name or ""):
            raise PayloadMismatch(ErrorKind.kv_unsafe_path, f"KV payload file name {name!r} is not one kvrelay writes")
        return f"{self.root}/{name}"


def _retried(call: Callable[[str], T], path: str) -> T:
    for attempt in range(RETRIES):
        try:
            return call(path)
        except PERMANENT:
            raise
        except OSError:  # ConnectionError and TimeoutError are OSErrors too
            time.sleep(BACKOFF_S * 2**attempt)
    return call(path)  # the last try: what it raises is the row's error
