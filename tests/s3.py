"""A local S3: moto's server on 127.0.0.1, reached through fsspec's config, so that a plain
`s3://` URL works in this process, in Ray's workers and in jobs run as subprocesses."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec
import fsspec.config
import pytest

BUCKET = "kvrelay-test"


@dataclass(frozen=True)
class Bucket:
    url: str  # s3://bucket
    endpoint: str  # http://127.0.0.1:port

    def fs(self) -> fsspec.AbstractFileSystem:
        """A filesystem that lists the bucket afresh on every call, as a poller needs (s3fs
        caches listings)."""
        return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)

    def parts(self, out: str) -> dict[str, tuple[str, object]]:
        """A job's committed parts under `out` by name, with their ETag and LastModified: a part
        written again, even with the same bytes, is a newer object."""
        found = {p.rsplit("/", 1)[-1]: i for p, i in self.fs().find(out, detail=True).items()}
        return {name: (i["ETag"], i["LastModified"]) for name, i in found.items() if name.startswith("part-")}


@contextmanager
def local_s3() -> Iterator[Bucket]:
    # Imported here: moto brings flask, and a process with flask loaded cannot build a vLLM CPU
    # engine (vLLM's kernel rebinding scans every loaded module); test modules reach Ray actors.
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # fsspec reads FSSPEC_<PROTOCOL>_<KWARG> into its config when it is imported: every process
        # started from here on (Ray's workers, a job's subprocess) gets the endpoint that way.
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                patch.delenv(name, raising=False)  # an engineer's own AWS settings must not leak in
            for name, value in env.items():
                patch.setenv(name, value)
            # This process imported fsspec before the variables were set.
            patch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": endpoint})
            bucket = Bucket(f"s3://{BUCKET}", endpoint)
            bucket.fs().mkdir(BUCKET)
            yield bucket
    finally:
        server.stop()
