"""Shared prompt prefixes travel once. Batch prompts often begin alike (a system prompt, a page
of few-shot examples, one document asked many questions); the prefill engine computes such a
prefix once (its prefix cache), and here its KV also crosses the handoff once per decode worker,
not once per row.

A prompt's KV moves in blocks of kv.shared_block_tokens tokens (pipeline/kv/codec.py Blocked).
Each whole block is named by a content hash of its parent block's hash and its own tokens,
salted with the model, cache dtype, codec, block size and LoRA adapter, so that a hash names the
whole prefix up to the block's end, as vLLM's prefix cache names its blocks. The hash is SHA-256, as
vLLM's: rows of many users meet in one batch, and a prompt crafted to collide with another's
prefix under a fast hash would hand its KV to that prompt. The prefill side
(`PrefixTracker`) takes a block as shared when another row of the batch, or an earlier row of
the same worker, has it too: rows then name it instead of carrying it, and it is stored once,
under its hash and the checksum of the copy stored (a `BlockKey`), in a `BlockStore`. The
decode side (`BlockCache`) fetches a block once while its cache holds it, and checks it against
its key's checksum then, once, not for every row that names it; its engine then loads only the
tokens its own prefix cache lacks (pipeline/kv/transfer.py Upload).

Stores: `ObjectBlocks` keeps blocks in Ray's object store, owned by one actor of the job that
counts the rows in flight that name each and frees a block when the last is decoded;
`FileBlocks` (kv.transport=storage) writes them as files beside the rows' own payload files,
removed with the job's folder."""

import hashlib
import uuid
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import ray

from pipeline.cluster import on_driver_node
from pipeline.kv.payload import KVPayload
from pipeline.kv.payload import checksum as stored_checksum
from pipeline.kv.store import PayloadStore

BlockKey = str  # a block's hash and its stored copy's checksum, in hex
# Per block, the rows (job-wide row numbers) in flight that name it: a row counts once however
# often a retried batch names it again or gives it back.
Holders = dict[BlockKey, set[int]]


def block_key(block_hash: bytes, checksum: int) -> BlockKey:
    return f"{block_hash.hex()}{checksum:016x}"


def sound(key: BlockKey, data: np.ndarray) -> bool:
    """Whether `data` are the bytes stored under `key`."""
    return stored_checksum(data) == int(key[-16:], 16)


def keys_of(payload: KVPayload) -> list[BlockKey]:
    return [block_key(h, c) for h, c in zip(payload.blocks, payload.block_checksums)]


def salt(fingerprint: str, dtype: str, codec: str, block_tokens: int, conditioning: str = "") -> bytes:
    """What a block's KV depends on besides its tokens: the engine, and the LoRA adapter it ran
    under (its digest; empty: none), so that two adapters never share a block."""
    return hashlib.sha256(f"{fingerprint}/{dtype}/{codec}/{block_tokens}/{conditioning}".encode()).digest()


def block_hashes(prompt: Sequence[int], block_tokens: int, salt: bytes) -> list[bytes]:
    """The hash of each whole block of `prompt` before its last token: decode computes that
    token itself, so a payload always carries at least the block that holds it."""
    whole = (len(prompt) - 1) // block_tokens
    ids = np.asarray(prompt[: whole * block_tokens], np.int64).reshape(whole, block_tokens)
    hashes, parent = [], salt
    for block in ids:
        parent = hashlib.sha256(parent + block.tobytes()).digest()
        hashes.append(parent)
    return hashes


@dataclass
class BatchShares:
    """One prefill batch's shared blocks: per row, the blocks it names; per block, the checksum
    of the copy the store holds, or the row whose KV supplies it (the first row that names it)."""

    named: dict[int, list[bytes]]
    held: dict[bytes, int]
    supplier: dict[bytes, int]

    def save_from(self, row: int) -> int:
        """The first of the row's blocks whose KV its engine must save: the row's own blocks,
        and the shared blocks it supplies, follow; the blocks before are stored already or
        supplied by another row."""
        hashes = self.named.get(row, [])
        return next((j for j, h in enumerate(hashes) if self.supplier.get(h) == row), len(hashes))


class PrefixTracker:
    """Prefill side: which leading blocks of each prompt are shared, and the checksum under
    which this worker stored each block it stored. Remembers at most `capacity` blocks."""

    def __init__(self, capacity: int = 1 << 18):
        self.capacity = capacity
        self.published: dict[bytes, int] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def plan(self, chains: dict[int, list[bytes]], numbers: list[int], store: "BlockStore") -> BatchShares:
        """What a batch's prompts (each row's block hashes, by its index in the batch) share,
        before its KV is computed: the blocks this worker stored that the store still holds
        are held there for the rows that name them (`numbers`: each row's job-wide number);
        the rest are supplied by the batch."""
        named = {i: chain[:k] for (i, chain), k in zip(chains.items(), self.shared(list(chains.values())))}
        known = {h: block_key(h, self.published[h]) for hashes in named.values() for h in hashes if h in self.published}
        holders: Holders = {}
        for i, hashes in named.items():
            for h in hashes:
                if h in known:
                    holders.setdefault(known[h], set()).add(numbers[i])
        held = store.hold(holders)
        self.forget([h for h, key in known.items() if key not in held])
        supplier: dict[bytes, int] = {}
        for i, hashes in named.items():
            for h in hashes:
                if h not in self.published:
                    supplier.setdefault(h, i)
        return BatchShares(named, {h: self.published[h] for h in known if h in self.published}, supplier)

    def shared(self, chains: list[list[bytes]]) -> list[int]:
        """Per prompt (its block hashes), how many of its first blocks are shared: each one
        also in another prompt of the batch, or seen by this worker before."""
        counts = Counter(h for chain in chains for h in chain)
        shared = []
        for chain in chains:
            k = 0
            while k < len(chain) and (counts[chain[k]] > 1 or chain[k] in self._seen):
                k += 1
            shared.append(k)
        for h in counts:
            self._seen[h] = None
            self._seen.move_to_end(h)
        while len(self._seen) > self.capacity:
            forgotten, _ = self._seen.popitem(last=False)
            self.published.pop(forgotten, None)
        return shared

    def forget(self, hashes: list[bytes]) -> None:
        """Blocks the store no longer holds: the next rows that share them store them anew."""
        for h in hashes:
            self.published.pop(h, None)


class BlockStore(ABC):
    """Where shared blocks are while rows that name them are in flight."""

    @abstractmethod
    def hold(self, holders: Holders) -> set[BlockKey]:
        """Of the blocks named, those the store holds, each now held for its rows too."""

    @abstractmethod
    def put(self, blocks: dict[BlockKey, np.ndarray], holders: Holders) -> None:
        """Stores new blocks, held for the rows that name them."""

    @abstractmethod
    def fetch(self, keys: list[BlockKey], folder: str | None) -> dict[BlockKey, np.ndarray]:
        """The bytes of the blocks it holds of `keys`, in memory of their own; `folder`: the
        payload file folder the rows came with (kv.transport=storage)."""

    @abstractmethod
    def release(self, rows: list[int]) -> None:
        """These rows are done with their blocks (decoded, or left without a payload): a block
        no row holds any more goes. Giving a row back twice changes nothing."""


class BlockRegistry:
    """The Ray actor that owns the job's shared blocks in the object store: each is freed when
    every row that names it is done with it."""

    def __init__(self) -> None:
        self._refs: dict[BlockKey, list[ray.ObjectRef]] = {}  # in a list: passed on, not resolved
        self._holders: Holders = {}
        self._held_by: dict[int, set[BlockKey]] = {}  # row -> the blocks it holds

    def hold(self, holders: Holders) -> set[BlockKey]:
        held = {key for key in holders if key in self._refs}
        self._hold({key: holders[key] for key in held})
        return held

    def add(self, blocks: dict[BlockKey, np.ndarray], holders: Holders) -> None:
        """Put here, so that this actor owns them (Ray 2.56 took `ray.put`'s `_owner` away):
        a block outlives the prefill worker that computed it. A block no row holds is not kept."""
        for key, data in blocks.items():
            if key not in self._refs and holders.get(key):  # another worker's copy may have come first
                self._refs[key] = [ray.put(data)]
        self.hold(holders)

    def refs(self, keys: list[BlockKey]) -> dict[BlockKey, list[ray.ObjectRef]]:
        return {key: self._refs[key] for key in keys if key in self._refs}

    def release(self, rows: list[int]) -> None:
        for row in rows:
            for key in self._held_by.pop(row, ()):
                self._holders[key].discard(row)
                if not self._holders[key]:
                    del self._holders[key]
                    self._refs.pop(key, None)

    def _hold(self, holders: Holders) -> None:
        for key, rows in holders.items():
            self._holders.setdefault(key, set()).update(rows)
            for row in rows:
                self._held_by.setdefault(row, set()).add(key)


def start_registry() -> tuple[str, ray.actor.ActorHandle]:
    """A fresh registry and the name stages find it by; it lives as long as the handle, on the
    driver's node: the blocks it owns would go with it."""
    name = f"kvrelay-blocks-{uuid.uuid4().hex[:8]}"
    return name, ray.remote(num_cpus=0)(BlockRegistry).options(name=name, **on_driver_node()).remote()


class ObjectBlocks(BlockStore):
    def __init__(self, registry_name: str):
        self.registry = ray.get_actor(registry_name)

    def hold(self, holders: Holders) -> set[BlockKey]:
        return ray.get(self.registry.hold.remote(holders)) if holders else set()

    def put(self, blocks: dict[BlockKey, np.ndarray], holders: Holders) -> None:
        # Waited for: the rows naming these blocks leave the batch next, and a decode worker
        # may ask for them at once.
        ray.get(self.registry.add.remote(blocks, holders))

    def fetch(self, keys: list[BlockKey], folder: str | None) -> dict[BlockKey, np.ndarray]:
        refs = ray.get(self.registry.refs.remote(keys)) if keys else {}
        values = ray.get([ref for (ref,) in refs.values()])
        # Copied out of the object store, so that a block the registry frees is freed.
        return {key: np.array(value) for key, value in zip(refs, values)}

    def release(self, rows: list[int]) -> None:
        if rows:
            self.registry.release.remote(rows)


class FileBlocks(BlockStore):
    """Blocks as files in the payload store's job folder, `<job>/blocks/<key>.kv`: a block
    is written once per prefill worker (a name is its content, so writing it again changes
    nothing) and removed with the job's folder."""

    def __init__(self, store: PayloadStore):
        self.store = store
        self._written: set[BlockKey] = set()

    def hold(self, holders: Holders) -> set[BlockKey]:
        return {key for key in holders if key in self._written}

    def put(self, blocks: dict[BlockKey, np.ndarray], holders: Holders) -> None:
        for key, data in blocks.items():
            self.store.put_block(key, data)
            self._written.add(key)

    def fetch(self, keys: list[BlockKey], folder: str | None) -> dict[BlockKey, np.ndarray]:
        found = {}
        for key in keys:
            data = self.store.fetch_block(folder, key)
            if data is not None:
                found[key] = data
        return found

    def release(self, rows: list[int]) -> None:
        return  # files go with the job's folder


@dataclass
class Fetched:
    """What a block cache gives for a batch: the sound blocks it holds or fetched, those of them
    it fetched now, and the keys whose bytes failed their checksum."""

    found: dict[BlockKey, np.ndarray]
    new: dict[BlockKey, np.ndarray]
    corrupt: set[BlockKey]


class BlockCache:
    """Decode side: the shared blocks a worker fetched, most recently used kept, up to
    `capacity` bytes. A block is checked against its key's checksum as it is fetched: one that
    fails is not kept, and is fetched again for the next batch that names it (a block stored
    while it was read may be whole by then)."""

    def __init__(self, store: BlockStore, capacity: int):
        self.store = store
        self.capacity = capacity
        self.nbytes = 0
        self._blocks: OrderedDict[BlockKey, np.ndarray] = OrderedDict()

    def get(self, keys: set[BlockKey], folder: str | None) -> Fetched:
        missing = [key for key in keys if key not in self._blocks]
        fetched = self.store.fetch(missing, folder) if missing else {}
        corrupt = {key for key, data in fetched.items() if not sound(key, data)}
        fetched = {key: data for key, data in fetched.items() if key not in corrupt}
        for key, data in fetched.items():
            self._blocks[key] = data
            self.nbytes += data.nbytes
        found = {key: self._blocks[key] for key in keys if key in self._blocks}
        for key in found:
            self._blocks.move_to_end(key)
        while self.nbytes > self.capacity and self._blocks:
            _, evicted = self._blocks.popitem(last=False)
            self.nbytes -= evicted.nbytes
        return Fetched(found, fetched, corrupt)


def block_store(store: PayloadStore | None, registry: str | None) -> BlockStore | None:
    """Where a job's shared blocks are: in the object store under `registry`, or files beside
    the payload files of `store` (kv.storage_path)."""
    if registry:
        return ObjectBlocks(registry)
    return FileBlocks(store) if store else None
