"""IdleTimeouts: the per-session idle timeouts a node remembers to slide a read in one command."""

from sessionstore.timeouts import IdleTimeouts


def test_default_until_a_session_shows_its_own():
    memo = IdleTimeouts(1800)
    assert memo.get("k") == 1800
    memo.seen("k", 7200)
    assert memo.get("k") == 7200
    memo.seen("k", 1800)  # back to the default: forgotten
    assert memo.get("k") == 1800 and memo._own == {}


def test_bounded_it_starts_over_when_full():
    memo = IdleTimeouts(1800, limit=3)
    for i in range(3):
        memo.seen(f"k{i}", 60 + i)
    memo.seen("k3", 99)
    assert memo.get("k3") == 99 and memo.get("k0") == 1800 and len(memo._own) == 1
