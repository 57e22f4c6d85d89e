"""kv.transport=storage: payload bytes in files under one root URL, the payload column keeping
only the file's name and checksum. For payloads too large for the object store, and for
handing KV to a decode job that runs elsewhere or later.

Names come from data (a prefill dataset may come from anywhere), so only names of the form
kvrelay writes are accepted: a file can never be read or removed outside the root."""
import re
import uuid
from dataclasses import replace

import fsspec
import numpy as np

from pipeline.kv.payload import KVPayload, PayloadLost, PayloadMismatch

_NAME = re.compile(r"[0-9a-f]{16}/[0-9a-f]{32}\.kv")


class PayloadStore:
    def __init__(self, url: str, job: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.url = url
        self.job = job  # this job's folder under the root

    def put(self, payload: KVPayload) -> KVPayload:
        """Writes the payload's bytes to a new file; returns the payload naming it."""
        name = f"{self.job}/{uuid.uuid4().hex}.kv"
        self.fs.makedirs(f"{self.root}/{self.job}", exist_ok=True)
        with self.fs.open(self._path(name), "wb") as f:
            f.write(memoryview(payload.data))
        return replace(payload, data=np.empty(0, np.uint8), file=name)

    def fetch(self, payload: KVPayload) -> KVPayload:
        try:
            data = self.fs.cat_file(self._path(payload.file))
        except FileNotFoundError:
            raise PayloadLost("kv_missing", f"KV payload file {payload.file} is missing from {self.url}") from None
        return replace(payload, data=np.frombuffer(data, np.uint8))

    def remove(self, names: list[str | None]) -> None:
        for path in (self._path(n) for n in names if n):
            if self.fs.exists(path):
                self.fs.rm_file(path)

    def remove_job(self) -> None:
        """This job's folder, with whatever a crashed run of it left behind."""
        if self.fs.exists(f"{self.root}/{self.job}"):
            self.fs.rm(f"{self.root}/{self.job}", recursive=True)

    def _path(self, name: str) -> str:
        if not _NAME.fullmatch(name or ""):
            raise PayloadMismatch("kv_unsafe_path", f"KV payload file name {name!r} is not one kvrelay writes")
        return f"{self.root}/{name}"
