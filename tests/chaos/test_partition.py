"""A memcached node cut off by a network partition and healed, while two client processes write.

The ring: three memcached nodes, each in a network namespace of its own behind a
veth link (:mod:`tests.servers.netns`). Node 3's link goes down for
``PARTITION`` seconds and comes up again: the node keeps running and keeps its
data, as after a real partition (not a restart). Two client processes
(:mod:`tests.chaos.partition_client`) increment 12 counters, each one a
``load_and_touch`` and a ``save`` conditional on the version read:

* ``a`` increments all 12 from start to end: it sees node 3 fail, writes node
  3's sessions to the next node while the link is down, and goes on through
  the heal (it only tries node 3 again ``retry_after`` seconds later);
* ``b`` increments all 12 before the partition; during it only the 3 whose
  two copies are on nodes 1 and 2, so it never talks to node 3 then (whatever
  it knows about the partition it learned from the ring, never by a failure of
  its own); from the moment the link is up, all 12 again.

Without shared suspicion ``b`` reads node 3's older copies right after the
heal, and its saves succeed on them: counters go back by the partition's
increments. Asserted (``events`` of both clients, times on the system-wide
monotonic clock):

* no session rolled back: no read returned less than a value whose save was
  acknowledged before the read started;
* no acknowledged update lost: no two acknowledged saves of a session wrote
  the same value, and each final value is at least the highest acknowledged one
  and at most the acknowledged plus the in-doubt increments;
* no deleted session came back: one more session of node 3, deleted by ``a``
  half way through the partition, is missing for ``b`` right after the heal
  and for a fresh process at the end;
* the partition bit: ``a`` had saves of node 3's sessions acknowledged while the
  link was down, ``b`` read node 3's sessions within a second of the heal,
  ``b`` never saw node 3 fail, and held it suspect by the end of the partition.

Timing has generous margins (a 10 s partition; ``b`` learns within about a
second). Every process is stopped by pid and the namespaces are deleted, also
when the test fails.
"""

from __future__ import annotations

import bisect
import json
import select
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from sessionstore.stores.memcached import MemcachedStore, _wire_key
from tests.servers.netns import NetnsNode, NetnsRing, start_netns_ring

ROOT = Path(__file__).resolve().parents[2]
SESSIONS = {"primary": 6, "backup": 3, "clear": 3, "doomed": 1}  # node 3: primary / backup / neither / primary
WARM, PARTITION, AFTER = 2.0, 10.0, 8.0
ANSWER_TIMEOUT = 60.0


@pytest.fixture
def netns_ring(tmp_path) -> NetnsRing:
    """Three memcached nodes in network namespaces of their own (stopped and deleted afterwards)."""
    ring = start_netns_ring(tmp_path)
    yield ring
    ring.stop()


class ClientProcess:
    """A :mod:`tests.chaos.partition_client` process in the clients namespace, asked over its pipes."""

    def __init__(self, ring: NetnsRing, url: str, name: str) -> None:
        self.name, self.log = name, ring.workdir / f"{name}.log"
        argv = [sys.executable, "-m", "tests.chaos.partition_client", "--url", url, "--name", name]
        self.proc = ring.spawn(argv, name, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, **command: object) -> dict:
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"client {self.name} gave no answer to {command['op']}; see {self.log}")
        return json.loads(line)

    def quit(self) -> None:
        self.proc.stdin.write(b'{"op": "quit"}\n')
        self.proc.stdin.close()
        self.proc.wait(ANSWER_TIMEOUT)


def placement(store: MemcachedStore, key: str) -> list[str]:
    """Names of the ring nodes in ``key``'s preference list (placement needs no server)."""
    return [node.name for node in store._rings[0].walk(_wire_key(key))]


def pick_sessions(url: str, cut: NetnsNode) -> dict[str, list[str]]:
    """Session keys by where node ``cut`` is in their preference list (see ``SESSIONS``)."""
    store, picked, n = MemcachedStore.from_url(url), defaultdict(list), 0
    roles = {0: ("primary", "doomed"), 1: ("backup",), 2: ("clear",)}
    while any(len(picked[role]) < count for role, count in SESSIONS.items()):
        key, n = f"sessionstore:{{partition-{time.time_ns()}-{n}}}", n + 1
        role = next((r for r in roles[placement(store, key).index(cut.name)] if len(picked[r]) < SESSIONS[r]), None)
        if role is not None:
            picked[role].append(key)
    return dict(picked)


@dataclass
class Verdict:
    """What the events of all clients show."""

    rollbacks: list[str]
    lost: list[str]
    acked: int
    in_doubt: int

    def format(self) -> str:
        lines = [f"{self.acked} acknowledged increments, {self.in_doubt} in doubt;"
                 f" {len(self.rollbacks)} rolled-back reads, {len(self.lost)} lost updates"]
        return "\n".join(lines + self.rollbacks[:5] + self.lost[:20])


def judge(events: list[list], finals: dict[str, int | None], origin: float = 0.0) -> Verdict:
    """Rollbacks and lost updates in ``events`` (``[client, key, read at, value, done, outcome, written]``);
    times in the messages are seconds from ``origin``, each rollback followed by its key's events near it."""
    acks: dict[str, list[tuple[float, int]]] = defaultdict(list)
    doubt = Counter()
    for client, key, _, _, done, outcome, written, *_ in events:
        if outcome == "ack":
            acks[key].append((done, written))
        elif outcome == "error":
            doubt[key] += 1
    best: dict[str, tuple[list[float], list[int]]] = {}
    for key, items in acks.items():
        items.sort()
        times, running, top = [], [], 0
        for done, written in items:
            top = max(top, written)
            times.append(done)
            running.append(top)
        best[key] = (times, running)
    rollbacks, lost = [], []
    for client, key, started, value, *_ in events:
        times, running = best.get(key, ([], []))
        i = bisect.bisect_left(times, started)
        if value is not None and i and value < running[i - 1]:
            near = [f"\n    {e[0]} {e[2] - origin:+.3f}..{e[4] - origin:+.3f}s read {e[3]}, {e[5]} {e[6]}"
                    for e in sorted(events, key=lambda e: e[2]) if e[1] == key and abs(e[2] - started) < 0.3]
            rollbacks.append(f"{client} read {value} of {key} at {started - origin:+.3f}s: "
                             f"{running[i - 1]} was acknowledged" + "".join(near))
    for key, final in finals.items():
        written = [w for _, w in acks.get(key, [])]
        for value, times in Counter(written).items():
            if times > 1:
                lost.append(f"{key}: {times} acknowledged saves wrote {value}")
        if written and (final is None or final < max(written)):
            lost.append(f"{key}: final value {final} < {max(written)} acknowledged")
        elif final is not None and final > len(written) + doubt[key]:
            lost.append(f"{key}: final value {final} > {len(written)} acknowledged + {doubt[key]} in doubt")
    return Verdict(rollbacks, lost, sum(len(v) for v in acks.values()), sum(doubt.values()))


def tagged(client: str, events: list[list]) -> list[list]:
    return [[client, *event] for event in events]


def mean_costs(events: list[list]) -> str:
    """Mean store commands per read and per save of ``events`` (a poll counts in the read it came with)."""
    done = [e for e in events if e[5] in ("ack", "conflict")]
    if not done:
        return "none"
    reads, saves = sum(e[7] for e in done) / len(done), sum(e[8] for e in done) / len(done)
    return f"{reads:.2f} per read, {saves:.2f} per save ({len(done)} increments)"


@pytest.mark.slow
def test_a_healed_partition_rolls_nothing_back(netns_ring: NetnsRing, capsys) -> None:
    ring, cut = netns_ring, netns_ring.nodes[2]
    url = ring.url(retry_after=5)
    sessions = pick_sessions(url, cut)
    doomed = sessions.pop("doomed")
    every = [key for keys in sessions.values() for key in keys]
    a, b = ClientProcess(ring, url, "a"), ClientProcess(ring, url, "b")
    assert a.ask(op="create", keys=every + doomed)["ok"]
    assert b.ask(op="read", keys=doomed)["values"] == [0]
    events: list[list] = []

    a.ask(op="start", keys=every)
    b.ask(op="start", keys=every)
    time.sleep(WARM)
    events += tagged("b", b.ask(op="stop")["events"])
    b.ask(op="start", keys=sessions["clear"])
    down = time.monotonic()
    ring.partition(cut)
    time.sleep(PARTITION / 2)
    assert a.ask(op="delete", keys=doomed)["deleted"] == [True]
    time.sleep(PARTITION / 2)
    b_during = b.ask(op="state")
    events += tagged("b", b.ask(op="stop")["events"])
    ring.heal(cut)
    up = time.monotonic()
    b.ask(op="start", keys=every)
    b_doomed = b.ask(op="read", keys=doomed)["values"]
    time.sleep(AFTER)
    events += tagged("a", a.ask(op="stop")["events"])
    events += tagged("b", b.ask(op="stop")["events"])
    a_state = a.ask(op="state")

    checker = ClientProcess(ring, url, "checker")  # a fresh process: reads as a newcomer would
    finals = dict(zip(every, checker.ask(op="read", keys=every)["values"]))
    checker_doomed = checker.ask(op="read", keys=doomed)["values"]
    verdict = judge(events, finals, origin=up)
    primary = set(sessions["primary"])
    window = [e for e in events if e[0] == "b" and e[1] in primary and e[2] > up]
    outside = [e for e in events if e[2] < down]
    with capsys.disabled():
        print(f"\npartition of {cut.name} for {PARTITION:.0f}s: {verdict.format()}\n"
              f"  commands before the partition: {mean_costs(outside)}\n"
              f"  b on node 3's sessions after the heal (suspect): {mean_costs(window)}")
    relocated = [e for e in events if e[0] == "a" and e[1] in primary and e[5] == "ack" and down < e[2] < up]
    b_after = [e for e in events if e[0] == "b" and e[1] in primary and up < e[2] < up + 1.0]
    assert relocated, "a wrote none of node 3's sessions during the partition: it did not bite"
    assert b_after, "b read none of node 3's sessions right after the heal"
    assert cut.name in a_state["failed"], a_state
    assert cut.name not in b_during["failed"], f"b saw node 3 fail itself: {b_during}"
    assert not verdict.rollbacks, verdict.format()
    assert not verdict.lost, verdict.format()
    assert b_doomed == checker_doomed == [None], "a session deleted during the partition came back"
    assert cut.name in b_during["suspects"], f"b did not learn from the ring that node 3 failed: {b_during}"
    reads = [e[7] for e in window if e[5] in ("ack", "conflict")]
    assert reads and statistics.median(reads) == 2, mean_costs(window)  # compared: both copies read
    assert statistics.median(e[7] for e in outside) == 1, mean_costs(outside)
    for client in (a, b, checker):
        client.quit()
