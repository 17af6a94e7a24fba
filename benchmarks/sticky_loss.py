"""Acknowledged writes a sticky node loses when it is SIGKILLed, by write rate.

For each write rate: a sticky node process (``tests/integration/sticky_node.py``)
with ``--backup async`` (or ``sync``, for comparison) serves browsers that each
increment their own session's counter over real HTTP at an even pace; after
``--seconds`` the node is SIGKILLed while they write. Every browser then moves
to a second node, which takes the session over from the Redis backup, and the
counter it serves is compared with the last value a response acknowledged.
"Lost" counts acknowledged increments that are not in the backup (a request in
flight at the kill may land without being acknowledged; it is not a loss and
does not offset one). A session whose backup never landed loses everything.

Redis is a throwaway ``redis-server`` on a free port (``tests/servers``).
``max`` as a rate means each browser sends its next request as soon as the
previous one is answered.

Usage: python benchmarks/sticky_loss.py [--rates 100,400,1600,max] [--browsers 8]
       [--seconds 2] [--backup async] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.sticky_node import recovered, start_node, write_until_killed  # noqa: E402
from tests.servers.process import ServerProcess  # noqa: E402
from tests.servers.redis_fixtures import start_redis  # noqa: E402

SECRET = "sticky-loss-benchmark"


@dataclass
class Trial:
    """One kill: what was acknowledged and what the backup still had."""

    rate: float | None
    achieved: float
    acknowledged: int
    lost: int
    sessions_gone: int


def run_trial(store: str, backup: str, rate: float | None, browsers: int, seconds: float,
              survivor: ServerProcess, workdir: Path) -> Trial:
    """Start a node, write at ``rate`` for ``seconds``, SIGKILL it, recover through ``survivor``."""
    node = start_node("n1", store, secret=SECRET, backup=backup, workdir=workdir)
    try:
        run = write_until_killed(node, browsers, seconds, rate)
    finally:
        node.kill()
    if run.errors:
        raise RuntimeError(f"requests failed before the kill: {run.errors[:3]}")
    values = recovered(run, survivor.port)
    lost = sum(max(0, acked - value) for acked, value in zip(run.acked, values))
    return Trial(rate, run.requests / run.seconds, sum(run.acked), lost, values.count(0))


def _rates(text: str) -> list[float | None]:
    return [None if part.strip() == "max" else float(part) for part in text.split(",")]


def _table(backup: str, trials: list[Trial]) -> None:
    print(f"\nbackup={backup}: acknowledged writes lost when the node is SIGKILLed")
    print(f"{'target/s':>9} {'achieved/s':>11} {'acknowledged':>13} {'lost':>6} {'lost %':>8} {'sessions gone':>14}")
    for t in trials:
        target = "max" if t.rate is None else f"{t.rate:.0f}"
        pct = 100 * t.lost / t.acknowledged if t.acknowledged else 0.0
        print(f"{target:>9} {t.achieved:>11.0f} {t.acknowledged:>13} {t.lost:>6} {pct:>7.2f}% {t.sessions_gone:>14}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=_rates, default=_rates("100,400,1600,max"),
                        help="total writes per second, comma-separated; 'max' = as fast as possible")
    parser.add_argument("--browsers", type=int, default=8, help="sessions writing at once")
    parser.add_argument("--seconds", type=float, default=2.0, help="writing time before the kill")
    parser.add_argument("--backup", choices=("async", "sync"), default="async")
    parser.add_argument("--repeat", type=int, default=3, help="kills per rate")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="sessionstore-sticky-loss-"))
    redis = start_redis(workdir)
    store = f"redis://127.0.0.1:{redis.port}/0"
    survivor = start_node("n2", store, secret=SECRET, workdir=workdir)
    trials: list[Trial] = []
    try:
        for rate in args.rates:
            for _ in range(args.repeat):
                trials.append(run_trial(store, args.backup, rate, args.browsers, args.seconds, survivor, workdir))
    finally:
        survivor.stop()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    _table(args.backup, trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
