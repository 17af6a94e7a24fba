"""The round-trip benchmark runs and the cost model's targets hold.

``benchmarks/roundtrips.py --quick`` starts its own redis-server and 3-node
memcached ring, drives the middleware in-process and counts store commands
on the servers. It exits 1 when a contract target is missed; this test also
checks the printed table: every row with a target says ``yes``, and no row
shows a difference between the servers' count and sessionstore's own
``store_ops`` (flagged ``!``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "roundtrips.py"

#: Table rows (group, label as printed without footnote marks) judged on both stores.
TARGET_ROWS = {
    ("non-sticky", "read-only"),
    ("non-sticky", "modifying"),
    ("non-sticky", "in-place mutation"),
    ("non-sticky", "session untouched"),
    ("non-sticky", "ignored path"),
    ("non-sticky", "empty new session"),
    ("sticky", "read-only on owner"),
    ("sticky", "modifying"),
}
#: A table line: label, "<redis> [<ops>][ !]", "<memcached> [<ops>][ !]", target, met.
_LINE = re.compile(
    r"^  (?P<label>\S.*?)(?: \(\d\))?\s+"
    r"(?P<redis>\d+\.\d{3}) \[(?P<redis_ops>\d+\.\d{3})\](?P<redis_flag> !)?\s+"
    r"(?P<mc>\d+\.\d{3}) \[(?P<mc_ops>\d+\.\d{3})\](?P<mc_flag> !)?\s+"
    r"(?P<target>.+?)\s+(?P<met>(?:yes|NO|-) / (?:yes|NO|-))$"
)


def _rows(stdout: str) -> list[dict]:
    """The table's rows, each with its group (the line above it that ends with ':')."""
    rows, group = [], None
    for line in stdout.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            group = line[:-1].split(" (")[0]  # "non-sticky", "non-sticky, locking=all", "sticky"
            continue
        match = _LINE.match(line)
        if match:
            rows.append({"group": group, **match.groupdict()})
        elif line.startswith("Per row"):
            break
    return rows


def _run() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_roundtrips_benchmark_meets_the_cost_model():
    done = _run()
    output = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    rows = _rows(done.stdout)
    assert len(rows) == 12, f"expected 12 table rows, parsed {len(rows)}\n{output}"
    name = {id(r): f"{r['group']}: {r['label']}" for r in rows}

    missed = [f"{name[id(r)]}: met? {r['met']} (target {r['target']})" for r in rows if "NO" in r["met"]]
    assert not missed, "cost-model targets missed (Redis / memcached):\n  " + "\n  ".join(missed) + f"\n{output}"
    mismatched = [name[id(r)] for r in rows if r["redis_flag"] or r["mc_flag"]]
    assert not mismatched, f"store_ops differs from the servers' count in: {mismatched}\n{output}"

    judged = {(r["group"], r["label"]) for r in rows if r["met"] == "yes / yes"}
    assert TARGET_ROWS <= judged, f"rows not judged on both stores: {TARGET_ROWS - judged}\n{output}"
    locked = [r for r in rows if "RTT" in r["target"]]
    assert len(locked) == 1 and locked[0]["met"].startswith("yes"), output
    read_only = next(r for r in rows if (r["group"], r["label"]) == ("non-sticky", "read-only"))
    assert (read_only["redis"], read_only["mc"]) == ("1.000", "1.000"), output

    assert done.returncode == 0, f"roundtrips.py exited {done.returncode}\n{output}"
    assert "all contract targets met" in done.stdout, output
