from __future__ import annotations

import pytest

from sessionstore.stores.memory import MemoryStore

from .contract import FeedContract, IndexContract, LockingContract


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class TestMemoryStore(LockingContract, IndexContract, FeedContract):
    @pytest.fixture
    def clock(self):
        return FakeClock()

    @pytest.fixture
    def store(self, clock):
        return MemoryStore(clock=clock)

    @pytest.fixture
    def elapse(self, clock):
        def advance(seconds: float) -> None:
            clock.now += seconds

        return advance


def test_lru_bounds_by_count_and_bytes():
    evicted = []
    store = MemoryStore(max_entries=3, max_bytes=1000, on_evict=evicted.append)
    for i in range(4):
        store.save(f"k{i}", b"x" * 10, 60)
    assert evicted == ["k0"] and len(store) == 3
    store.load("k1")  # k1 becomes most recent
    store.save("big", b"y" * 990, 60)
    assert "k1" not in evicted or evicted[-1] != "k1"
    assert store.nbytes <= 1000


def test_expired_entries_are_swept_on_write():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for i in range(10):
        store.save(f"old{i}", b"x", 1)
    clock.now += 5
    store.save("fresh", b"y", 60)
    assert len(store) == 1
