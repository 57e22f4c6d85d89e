"""A row's images, fetched and decoded by kvrelay rather than vLLM (whose own fetch knows http(s),
data: and local files, not s3 or other fsspec URLs): any fsspec URL, a data: URL (base64), or
raw bytes. A row's images are named by one digest of their bytes: its KV depends on them, so
its payload, its prefix-cache salt and its multimodal cache keys carry it
(pipeline/stages/engine_stage.py Request). An image that cannot be fetched or decoded is its
row's error, `image_unreadable`."""

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.columns import ErrorKind, row_error

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True)
class RowImages:
    """A row's images, in prompt order, and what they are."""

    images: tuple["Image", ...]
    digests: tuple[str, ...]  # each image's, of its bytes

    @property
    def digest(self) -> str:
        """All of them, in order: the row's image identity."""
        return hashlib.sha256("/".join(self.digests).encode()).hexdigest()[:32]


class ImageUnreadable(ValueError):
    def __init__(self, url: str, reason: str):
        super().__init__(row_error(ErrorKind.image_unreadable, f"{shown(url)}: {reason}"))


def load_images(urls: list[str]) -> RowImages:
    """The images at `urls`, decoded, or ImageUnreadable naming the first that is not."""
    images, digests = [], []
    for url in urls:
        data = fetch(url)
        images.append(decode(url, data))
        digests.append(hashlib.sha256(data).hexdigest()[:32])
    return RowImages(tuple(images), tuple(digests))


def fetch(url: str) -> bytes:
    """The bytes at `url`: a data: URL's own, or what fsspec reads there (a local path, file://,
    http(s)://, s3://, memory://...)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ImageUnreadable(url, "a data URL of an image must be base64")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ImageUnreadable(url, f"bad base64 ({error})") from None
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except Exception as error:  # noqa: BLE001 - whatever the filesystem raises is the row's error
        raise ImageUnreadable(url, f"{type(error).__name__}: {error}") from None


def decode(url: str, data: bytes) -> "Image":
    """The image in `data`, as RGB; fully decoded now, so that a truncated file fails here."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for bad bytes
        raise ImageUnreadable(url, f"not a readable image ({type(error).__name__}: {error})") from None


def data_url(data: bytes) -> str:
    """Image bytes as a data: URL, so that an image column's bytes travel as image URLs do."""
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def shown(url: str) -> str:
    """A URL as an error names it: a data: URL by its start."""
    return url if not url.startswith("data:") or len(url) <= 48 else url[:40] + "..."
