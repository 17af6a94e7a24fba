"""The chaos run under pytest: one run per mode × store, each asserting no acknowledged write is lost.

Each run (see :mod:`tests.chaos.chaos`): 3 app nodes behind the balancer, 20
virtual users, ``CHAOS_SECONDS`` (default 35) seconds of load during which
app nodes n1 and n2 are SIGKILLed and restarted, and Redis is SIGKILLed and
restarted from its fsync'ed AOF, or one memcached ring node is SIGKILLed and
left dead. The four runs take about 2.5 minutes together.

Asserted for ``non-sticky`` and ``sticky`` with ``backup="sync"``, on both
stores: every counter is readable at the end, no session came back new, no
acknowledged increment is missing, none was applied beyond the in-doubt
requests; in sticky mode the store's copy of every session equals the owner
node's copy. Also that the faults happened and bit (failovers, errors).
"""

from __future__ import annotations

import os

import pytest

from tests.chaos import chaos
from tests.chaos.chaos import Scenario, run_scenario

SECONDS = float(os.environ.get("CHAOS_SECONDS", "35"))
USERS = int(os.environ.get("CHAOS_USERS", "20"))


@pytest.mark.slow
@pytest.mark.parametrize("store", ["redis", "memcached"])
@pytest.mark.parametrize("mode", ["non-sticky", "sticky"])
def test_no_acknowledged_write_lost(mode: str, store: str, tmp_path, capsys) -> None:
    report = run_scenario(Scenario(mode, store, seconds=SECONDS, users=USERS, backup="sync"), tmp_path,
                          log=lambda line: None)
    text = report.format()
    with capsys.disabled():
        print("\n" + text)

    # every process the run started is stopped
    assert not chaos._live, f"processes left running: {[p.name for p in chaos._live.values()]}"
    # the faults happened, and the load ran through them
    assert all(event.done_at is not None for event in report.events), text
    assert report.acked >= 50 * USERS, text
    assert all(user.acked > 0 for user in report.users), text
    if mode == "sticky":
        # the sessions of the killed nodes failed over to other nodes
        assert report.causes["route-changed"] > 0, text
    else:
        # the killed nodes were routed around
        assert report.balancer["refused"] > 0, text

    # the invariants
    assert not report.unread, text
    assert report.sessions_lost == 0, text
    assert report.updates_lost == 0, text
    assert report.over_counted == 0, text
    if mode == "sticky":
        assert all(user.store_copy is not None for user in report.users), text
        assert not report.stale_store_copies, text
    assert report.ok, text
