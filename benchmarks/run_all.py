"""Run every benchmark in sequence and print every table.

Steps, in order (each is its own process; its output is shown as it runs):

1. ``overhead.py``    — per-request cost of the middleware, in-process, memory store;
2. ``big_session.py`` — ``dict(session)`` on 38,000 small attributes against 10 of the same size;
3. ``roundtrips.py``  — store commands per request against the contract's cost model;
4. ``peers.py``       — sessionstore against Flask-Session 0.8 and Beaker 1.14;
5. ``node_copy.py``   — sticky mode's node copy (LMDB shared by a node's workers): commands per read under
   ``gunicorn -w 4``, read overhead vs a per-process dict, throughput vs Flask-Session, memory;
6. ``sticky_loss.py`` — acknowledged writes lost when a sticky node is SIGKILLed
   (always a short run here; run it on its own for the full sweep).

``--quick`` runs each step with its smoke-test settings. A step that does not
exist is skipped, and said so. The summary at the end gives each step's exit
status and run time; ``run_all.py`` exits 1 if any step exited non-zero
(``roundtrips.py`` exits 1 when a contract target is missed, ``big_session.py``
when its ratio is over 50x; ``peers.py`` and ``node_copy.py`` report their targets as
MET / MISSED lines and exit 0 unless they failed).

Usage: python benchmarks/run_all.py [--quick] [--duration SECONDS] [--skip peers,node_copy,sticky_loss]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Step:
    name: str
    script: str
    full: list[str]
    quick: list[str]
    #: used instead of ``quick`` when the script has no ``--quick`` option (checked in its ``--help``)
    quick_fallback: list[str] | None = None
    always_quick: bool = False


STEPS = [
    Step("overhead", "overhead.py", [], ["--quick"], ["--rounds", "3", "--requests", "1000"]),
    Step("big_session", "big_session.py", [], ["--quick"], ["--rounds", "5"]),
    Step("roundtrips", "roundtrips.py", [], ["--quick"]),
    Step("peers", "peers.py", [], ["--quick"]),
    Step("node_copy", "node_copy.py", [], ["--quick"]),
    Step("sticky_loss", "sticky_loss.py", [], ["--quick"],
         ["--rates", "400,max", "--repeat", "1", "--seconds", "1"], always_quick=True),
]


def _help(script: Path) -> str:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    return done.stdout


def _arguments(step: Step, script: Path, quick: bool) -> list[str]:
    if not (quick or step.always_quick):
        return list(step.full)
    if step.quick_fallback is None:
        return list(step.quick)
    text = _help(script)
    if "--quick" in text:
        return list(step.quick)
    fallback = step.quick_fallback  # flag/value pairs; keep those the script knows
    return [part for flag, value in zip(fallback[::2], fallback[1::2]) if flag in text for part in (flag, value)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every step with its smoke-test settings")
    parser.add_argument("--duration", type=float, help="peers.py: seconds of each wrk run")
    parser.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {','.join(s.name for s in STEPS)}")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {s.name for s in STEPS}
    if unknown:
        parser.error(f"unknown step(s) {sorted(unknown)}")

    load = os.getloadavg()
    print(f"run_all.py: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + (" (quick)" if args.quick else ""), flush=True)
    summary: list[tuple[str, str, float]] = []
    for step in STEPS:
        script = HERE / step.script
        if step.name in skip:
            summary.append((step.name, "skipped (--skip)", 0.0))
            continue
        if not script.exists():
            summary.append((step.name, "skipped (not present)", 0.0))
            continue
        argv_step = _arguments(step, script, args.quick)
        if step.name == "peers" and args.duration is not None:
            argv_step += ["--duration", f"{args.duration:g}"]
        command = [sys.executable, str(script), *argv_step]
        print(f"\n{'#' * 100}\n# {step.script} {' '.join(argv_step)}\n{'#' * 100}", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.run(command, cwd=ROOT).returncode
        except KeyboardInterrupt:
            summary.append((step.name, "interrupted", time.monotonic() - started))
            break
        elapsed = time.monotonic() - started
        summary.append((step.name, f"exit {code}", elapsed))

    load = os.getloadavg()
    print(f"\n{'#' * 100}\n# summary (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})\n{'#' * 100}")
    failed = False
    for name, status, elapsed in summary:
        print(f"  {name:12} {status:22} {elapsed:7.1f} s")
        failed |= status.startswith("exit") and status != "exit 0" or status == "interrupted"
    if failed:
        print("  a step exited non-zero: roundtrips.py does so when a contract target is missed (see its"
              " TARGETS MISSED);\n  any other non-zero exit is an error in that step (see its output above).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
