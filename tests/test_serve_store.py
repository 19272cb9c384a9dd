"""The branch store alone (no model): keys, origins, LRU spill and drop, pins, ids that were deleted."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from psynth_jax.model.kv_cache import BranchCaches
from psynth_jax.serve.store import BranchKey, BranchMismatch, BranchNotFound, BranchStore, Origin
from psynth_jax.synthesis.handoff import Handoff

ORIGIN = Origin("model-a", "none", Handoff())


def caches(value: float) -> BranchCaches:
    k = jnp.full((2, 1, 1, 64, 2, 8), value, jnp.float32)
    return BranchCaches(k=k, v=k + 1, lengths=jnp.asarray([[5]], jnp.int32), offsets=jnp.asarray([[3]], jnp.int32))


def key(i: int, origin: Origin = ORIGIN) -> BranchKey:
    return BranchKey(origin, (1, 2, 3), (10 + i,), True)


SIZE = 2 * 2 * 64 * 2 * 8 * 4 + 8  # one branch's bytes (k, v, lengths, offsets)


def add(store: BranchStore, i: int, origin: Origin = ORIGIN):
    return store.add(key(i, origin), lambda: caches(float(i)), kept=1, text=f"b{i}", finish_reason="stop")


def test_a_branch_of_another_model_adapter_or_handoff_is_refused():
    store = BranchStore(device_budget=10 * SIZE)
    mine = add(store, 0)
    for other in (Origin("model-b", "none", Handoff()), Origin("model-a", "/runs/x", Handoff()),
                  Origin("model-a", "none", Handoff(convention="release"))):
        theirs = add(store, 1, other)
        with pytest.raises(BranchMismatch, match=f"branch '{theirs.id}' was made under"):
            store.check([mine.id, theirs.id], ORIGIN)
        with pytest.raises(BranchMismatch):
            store.acquire([theirs.id], ORIGIN)
    assert store.stats()["pins"] == 0
    assert len(store.check([mine.id], ORIGIN)) == 1


def test_identical_branches_share_arrays_and_ids_stay_independent():
    store = BranchStore(device_budget=10 * SIZE)
    made = []
    first = store.add(key(0), lambda: made.append(1) or caches(0.0), kept=1, text="b", finish_reason="stop")
    second = store.add(key(0), lambda: made.append(2) or caches(0.0), kept=1, text="b", finish_reason="stop")
    assert made == [1] and (first.reused, second.reused) == (False, True) and first.id != second.id
    store.delete(first.id)
    with pytest.raises(BranchNotFound, match="was deleted"):
        store.info(first.id)
    with pytest.raises(BranchNotFound, match="no branch 'br-x'"):
        store.info("br-x")
    assert store.info(second.id).location == "device" and store.stats()["branches"] == 1
    store.delete(second.id)
    assert store.stats()["branches"] == 0


def test_lru_spill_to_host_pins_and_drop_past_the_host_budget():
    store = BranchStore(device_budget=2 * SIZE, host_budget=2 * SIZE)
    a, b = add(store, 0), add(store, 1)
    lease = store.acquire([a.id], ORIGIN)  # a: pinned and most recently used
    c = add(store, 2)
    assert [store.info(i).location for i in (a.id, b.id, c.id)] == ["device", "host", "device"]
    d = add(store, 3)  # c is the least recently used unpinned branch on the device
    assert store.info(c.id).location == "host" and store.info(a.id).location == "device"
    store.release(lease)
    back = store.acquire([b.id], ORIGIN)  # b comes back; the least recently used device branch spills
    assert float(back.caches[0].k[0, 0, 0, 0, 0, 0]) == 1.0 and store.info(b.id).location == "device"
    store.release(back)
    add(store, 4)
    add(store, 5)  # the host holds two branches: the least recently used ones go
    gone = [i for i in (a.id, b.id, c.id, d.id) if _missing(store, i)]
    assert gone and all("evicted" in _missing(store, i) for i in gone)
    stats = store.stats()
    assert stats["device_bytes"] <= 2 * SIZE and stats["host_bytes"] <= 2 * SIZE and stats["pins"] == 0


def test_a_branch_deleted_while_pinned_goes_when_released():
    store = BranchStore(device_budget=4 * SIZE)
    a = add(store, 0)
    lease = store.acquire([a.id], ORIGIN)
    store.delete(a.id)
    assert store.stats()["branches"] == 1 and store.stats()["pins"] == 1
    store.release(lease)
    assert store.stats()["branches"] == 0 and store.stats()["pins"] == 0


def _missing(store: BranchStore, branch_id: str) -> str:
    try:
        store.info(branch_id)
    except BranchNotFound as err:
        return str(err)
    return ""
