"""Shared prefix blocks: content hashes that name a whole prefix, the prefill side's rule for
what is shared, the stores (files; the object store under the job's registry, freed when the
last row that names a block is decoded) and the decode side's cache, fetching a block once
while it holds it."""

import numpy as np
import pytest
import ray

from pipeline.kv.blocks import (
    BlockCache,
    BlockRegistry,
    Fetched,
    FileBlocks,
    ObjectBlocks,
    PrefixTracker,
    block_hashes,
    block_key,
    salt,
)
from pipeline.kv.payload import KVPayload, PayloadLost, checksum
from pipeline.kv.store import PayloadStore
from pipeline.stages.decode import shared_of

SALT = salt("bd177de378b0fff7", "float32", "none", 4)
PREFIX = list(range(100, 108))  # two whole blocks of 4


def test_a_block_hash_names_the_whole_prefix_to_its_end():
    a = block_hashes([*PREFIX, 1, 2, 3, 4, 5], 4, SALT)
    b = block_hashes([*PREFIX, 1, 2, 3, 9, 5], 4, SALT)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    # The same tokens after another prefix are another block.
    assert block_hashes([0, *PREFIX[1:], 1], 4, SALT)[1] != a[1]
    # Never the block of the last token, which decode computes itself.
    assert len(block_hashes(PREFIX, 4, SALT)) == 1 and block_hashes([7], 4, SALT) == []
    # Another model, dtype, codec or block size: other blocks.
    assert block_hashes(PREFIX + [1], 4, salt("bd177de378b0fff7", "float32", "int8", 4)) != a[:2]


def test_blocks_are_shared_within_a_batch_and_with_what_the_worker_saw_before():
    tracker = PrefixTracker()
    shared_prefix = block_hashes([*PREFIX, 1, 2, 3, 4, 5], 4, SALT)
    half = block_hashes([*PREFIX[:4], 9, 9, 9, 9, 5], 4, SALT)  # shares the first block only
    alone = block_hashes(list(range(20, 33)), 4, SALT)
    assert tracker.shared([shared_prefix, half, alone]) == [1, 1, 0]
    # Seen once before: shared now, though alone in its batch; what was never seen is not.
    assert tracker.shared([block_hashes([*PREFIX, 7], 4, SALT)]) == [2]
    assert tracker.shared([block_hashes(list(range(50, 60)), 4, SALT)]) == [0]


def test_a_tracker_forgets_the_oldest_blocks_and_their_stored_copies():
    tracker = PrefixTracker(capacity=2)
    first, second = block_hashes([*PREFIX, 1], 4, SALT), block_hashes(list(range(40, 49)), 4, SALT)
    tracker.shared([first])
    tracker.published[first[0]] = 1
    tracker.shared([second])
    assert first[0] not in tracker.published and tracker.shared([first]) == [0]


def test_a_batch_supplies_each_shared_block_once_and_saves_no_stored_block(tmp_path):
    store = FileBlocks(PayloadStore(str(tmp_path), "0" * 16))
    tracker = PrefixTracker()
    a, b = (block_hashes([*PREFIX, 1, 2, 3, n, 5], 4, SALT) for n in (4, 9))
    shares = tracker.plan({0: a, 1: b}, [10, 11], store)
    assert shares.named == {0: a[:2], 1: b[:2]} and shares.supplier == {a[0]: 0, a[1]: 0}
    assert (shares.save_from(0), shares.save_from(1)) == (0, 2)  # row 1's engine saves its own blocks only
    # Stored: a later batch names the blocks and its engine saves none of them.
    tracker.published.update({h: 7 for h in a[:2]})
    store.put({block_key(h, 7): np.zeros(4, np.uint8) for h in a[:2]}, {})
    later = tracker.plan({5: block_hashes([*PREFIX, 6], 4, SALT)}, [0] * 6, store)
    assert later.held == {a[0]: 7, a[1]: 7} and later.supplier == {} and later.save_from(5) == 2


def _key(n: int, data: np.ndarray) -> str:
    return block_key(bytes([n]) * 32, checksum(data))


def test_the_decode_cache_fetches_a_block_once_while_it_holds_it(tmp_path):
    store = PayloadStore(str(tmp_path), "0" * 16)
    contents = [np.full(1000, k, np.uint8) for k in range(3)]
    blocks = {_key(k, data): data for k, data in enumerate(contents)}
    FileBlocks(store).put(blocks, {})
    cache = BlockCache(FileBlocks(store), capacity=2500)  # two of the three blocks
    k0, k1, k2 = blocks
    got = cache.get({k0, k1}, "0" * 16)
    assert {k: v.tolist() for k, v in got.found.items()} == {k: blocks[k].tolist() for k in (k0, k1)}
    assert set(got.new) == {k0, k1}
    assert cache.get({k0}, "0" * 16).new == {}  # held: now the most recently used
    assert set(cache.get({k2}, "0" * 16).new) == {k2}  # k1, least recently used, goes
    assert cache.get({k0, k2}, "0" * 16).new == {}
    assert set(cache.get({k1}, "0" * 16).new) == {k1}
    assert cache.get({"f" * 80}, "0" * 16) == Fetched({}, {}, set())  # a block the store lacks


def test_the_decode_cache_checks_a_block_once_as_it_fetches_it(tmp_path, model):
    """A block whose bytes are not those its key names is neither kept nor returned: rows that
    name it are kv_corrupt. One that is sound is checked once, not for each row."""
    store = PayloadStore(str(tmp_path), "0" * 16)
    data = np.arange(1000, dtype=np.uint8)
    good, bad = block_key(b"g" * 32, checksum(data)), block_key(b"b" * 32, checksum(data) ^ 1)
    FileBlocks(store).put({good: data, bad: data}, {})
    cache = BlockCache(FileBlocks(store), capacity=1 << 20)
    got = cache.get({good, bad}, "0" * 16)
    assert set(got.found) == set(got.new) == {good} and got.corrupt == {bad}
    shape = model.cache.token_shape(5)  # one shared block of 4, one own token
    p = KVPayload.of(np.zeros(0, np.uint8), shape, model, "none", 4, [b"b" * 32], [checksum(data) ^ 1])
    with pytest.raises(PayloadLost, match="^kv_corrupt: KV block .* fails its checksum"):
        shared_of(p, got)


def test_a_block_caught_half_written_is_fetched_again_for_the_next_batch(tmp_path):
    """A reader that found a short file (a block stored while it read) refuses it for that
    batch only; once the block is whole, the next batch that names it gets it."""
    store = PayloadStore(str(tmp_path), "0" * 16)
    data = np.arange(1000, dtype=np.uint8)
    key = _key(1, data)
    path = tmp_path / ("0" * 16) / "blocks" / f"{key}.kv"
    path.parent.mkdir(parents=True)
    path.write_bytes(data[:300].tobytes())
    cache = BlockCache(FileBlocks(store), capacity=1 << 20)
    assert cache.get({key}, "0" * 16).corrupt == {key}
    path.write_bytes(data.tobytes())
    assert cache.get({key}, "0" * 16).found[key].tolist() == data.tolist()


def test_a_block_is_stored_whole_under_its_name_and_never_rewritten(tmp_path):
    """Another prefill worker storing the same block while decode workers read it: the block in
    place stays as it is, and none is ever visible part written."""
    store = PayloadStore(str(tmp_path), "0" * 16)
    data = np.arange(1000, dtype=np.uint8)
    key = _key(1, data)
    path = tmp_path / ("0" * 16) / "blocks" / f"{key}.kv"
    store.put_block(key, data)
    written = path.stat()
    store.put_block(key, data)
    assert path.stat().st_ino == written.st_ino and path.stat().st_mtime_ns == written.st_mtime_ns
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing left aside


@pytest.fixture
def registry(ray_cluster):
    actor = ray.remote(num_cpus=0)(BlockRegistry).options(name="test-blocks").remote()
    yield ObjectBlocks("test-blocks")
    ray.kill(actor)


def test_the_registry_frees_a_block_when_its_last_row_is_done_with_it(registry):
    block = np.arange(256, dtype=np.uint8)
    registry.put({"a": block}, {"a": {0, 1}})  # two rows of one batch name it
    assert registry.hold({"a": {2}, "b": {2}}) == {"a"}  # a third row, in a later batch
    assert registry.fetch(["a", "b"], None)["a"].tolist() == block.tolist()
    registry.release([0, 1])
    assert list(registry.fetch(["a"], None)) == ["a"]
    registry.release([2])
    assert registry.fetch(["a"], None) == {} and registry.hold({"a": {3}}) == set()


def test_a_row_given_back_twice_frees_nothing_another_row_holds(registry):
    """A decode batch retried after it gave its rows back gives them back again; a prefill
    batch retried holds its rows again: neither changes what other rows hold."""
    block = np.arange(256, dtype=np.uint8)
    registry.put({"a": block}, {"a": {0, 1}})
    registry.hold({"a": {0, 1}})  # the prefill batch, retried
    registry.release([0])
    registry.release([0])  # the decode batch, retried
    assert list(registry.fetch(["a"], None)) == ["a"]  # row 1 still holds it
    registry.release([1])
    assert registry.fetch(["a"], None) == {}


def test_a_block_the_registry_freed_is_supplied_again(registry):
    tracker, chain = PrefixTracker(), block_hashes([*PREFIX, 1], 4, SALT)
    assert tracker.plan({0: chain, 1: chain}, [0, 1], registry).supplier == {h: 0 for h in chain}
    keys = [block_key(h, 3) for h in chain]
    tracker.published.update({h: 3 for h in chain})
    registry.put({key: np.zeros(4, np.uint8) for key in keys}, {key: {0, 1} for key in keys})
    assert tracker.plan({0: chain}, [2], registry).held == {h: 3 for h in chain}
    registry.release([0, 1, 2])  # the three rows decoded
    again = tracker.plan({0: chain}, [3], registry)
    assert again.held == {} and again.supplier == {h: 0 for h in chain} and again.save_from(0) == 0
