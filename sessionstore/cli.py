"""The ``sessionstore`` command (also ``python -m sessionstore``).

One function per subcommand adds its parser and sets ``run``, the function
that does the work and returns the exit status::

    sessionstore demo [--mode non-sticky|sticky] [--store URL] [--kill-node] [--host H] [--port P]
                      [--selftest]
    sessionstore inspect SESSION --store URL [--key-prefix P] [--secret-key K ...]
                                 [--encryption-key K ...] [--json]
    sessionstore doctor --store URL [--setting field=value ...]
    sessionstore stats --url http://host:port/path [--json]
    sessionstore migrate --store URL

The work of ``inspect``, ``doctor``, ``stats`` and ``migrate`` lives in
:mod:`sessionstore.diagnose`. Exit status: 0 success, 1 the thing checked is
not well (session missing, a FAIL line, stats not fetched), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable

from . import __version__
from .errors import ConfigError, StoreError

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(_dash_ids(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"sessionstore {args.command}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionstore", description="Distributed sessions for Python WSGI apps."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


# -- demo -----------------------------------------------------------------------------------------


def add_demo(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "demo",
        help="run two app nodes behind a load balancer, sharing sessions (or check it all with --selftest)",
        description="Start two node processes serving a small app wrapped in SessionMiddleware (debug on) and "
                    "a load balancer in front of them, on the embedded local:// store in a temporary directory unless "
                    "--store says otherwise, and print the URL to open. Ctrl-C stops everything.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the balancer listens on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=None,
                   help="port the balancer listens on, 0 for any free one (default: 8000; with --selftest: any)")
    p.add_argument("--mode", choices=("non-sticky", "sticky"), default="non-sticky",
                   help="non-sticky: round robin, the store holds the session; sticky: the balancer routes by "
                        "the cookie's .n1/.n2 route, the store holds a backup (default: %(default)s)")
    p.add_argument("--store", default=None,
                   help="store URL, e.g. redis://127.0.0.1:6379/0 or memcached://127.0.0.1:11211 "
                        "(default: the embedded local:// store in a temporary directory)")
    p.add_argument("--kill-node", action="store_true",
                   help="put a button on the page that kills the node answering it with SIGKILL, to watch "
                        "the failover (a dead node is restarted after a few seconds); the self-test then "
                        "kills its node through that button")
    p.add_argument("--selftest", action="store_true",
                   help="start the demo on free ports, walk through it with an HTTP client through the balancer "
                        "(ending with a node killed), stop everything, exit 0 if all steps pass")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.selftest:
        return demo.selftest(mode=args.mode, store=args.store, host=args.host,
                             port=args.port or 0, kill_node=args.kill_node)
    return demo.serve(host=args.host, port=8000 if args.port is None else args.port, store=args.store,
                      mode=args.mode, kill_node=args.kill_node)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=os.environ.get("SESSIONSTORE_STORE"),
                   help="store URL, as in the settings (default: $SESSIONSTORE_STORE)")


def _require_store(args: argparse.Namespace) -> str:
    if not args.store:
        raise ConfigError("store", "give --store URL (or set SESSIONSTORE_STORE)")
    return args.store


# -- inspect --------------------------------------------------------------------------------------


def add_inspect(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "inspect",
        help="show what the store holds about one session, or why it is gone",
        description="Read a session without sliding its expiry: attributes, TTL, tombstone. "
                    "Exit 0 if the app would load it, 1 if not (missing, corrupt, bad signature), "
                    "2 on usage, configuration or connection errors.",
    )
    p.add_argument("session", metavar="SESSION", help="a session id, or a signed cookie value")
    _store_option(p)
    p.add_argument("--key-prefix", default=os.environ.get("SESSIONSTORE_KEY_PREFIX", "sessionstore:"),
                   help="the key_prefix setting (default: %(default)s)")
    p.add_argument("--secret-key", action="append", metavar="K",
                   help="verify a cookie value with this key (repeat for rotated keys; "
                        "default: $SESSIONSTORE_SECRET_KEY, comma-separated)")
    p.add_argument("--encryption-key", action="append", metavar="K",
                   help="decrypt a session encrypted at rest (default: $SESSIONSTORE_ENCRYPTION_KEY)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from . import diagnose
    from .stores import open_store

    url = _require_store(args)
    if url.partition("://")[0].lower() == "memory":
        raise ConfigError("store", "memory:// sessions live inside the application's process; "
                                   "inspect needs a shared store (redis://, memcached://, SQL)")
    secret_keys = diagnose.env_keys(args.secret_key, "SESSIONSTORE_SECRET_KEY")
    reading = diagnose.read_cookie_value(args.session, secret_keys)
    store = open_store(url, app=diagnose.app_identity({"key_prefix": args.key_prefix}))
    try:
        found = diagnose.inspect_session(
            store, reading.session_id, key_prefix=args.key_prefix, store_name=diagnose.redact(url),
            encryption_keys=diagnose.env_keys(args.encryption_key, "SESSIONSTORE_ENCRYPTION_KEY"))
    except StoreError as exc:
        print(f"sessionstore inspect: cannot read the store {diagnose.redact(url)}: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    found.form, found.signature = reading.form, reading.signature
    if args.json:
        _print_lines([json.dumps(found.as_json(), indent=2, ensure_ascii=False)])
    else:
        _print_lines(diagnose.render_inspection(found))
    return 0 if found.usable else 1


#: A session id or cookie value (URL-safe base64 may start with ``-``).
_DASH_ID = re.compile(r"-[A-Za-z0-9_-]{42}[A-Za-z0-9_.-]*")
_VALUED = ("--store", "--key-prefix", "--secret-key", "--encryption-key")


def _dash_ids(argv: list[str]) -> list[str]:
    """``inspect -Xy…``: pass an id starting with ``-`` as ``session=-Xy…`` so argparse takes it as one."""
    if not argv or argv[0] != "inspect":
        return argv
    return [f"session={arg}" if _DASH_ID.fullmatch(arg) and argv[i - 1] not in _VALUED else arg
            for i, arg in enumerate(argv)]


def _print_lines(lines: list[str]) -> None:
    print("\n".join(lines))


# -- doctor ---------------------------------------------------------------------------------------


def add_doctor(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "doctor",
        help="check a store (reachability, eviction, clock, persistence) and a configuration",
        description="Probe the store and its server and print OK/WARN/FAIL lines; exit 0 if no FAIL. "
                    "Settings to check come from SESSIONSTORE_* variables and --setting options.",
    )
    _store_option(p)
    p.add_argument("--setting", action="append", default=[], metavar="FIELD=VALUE",
                   help="a setting to check, e.g. cookie_secure=true (repeatable; prefer SESSIONSTORE_SECRET_KEY "
                        "for keys, command lines are visible to other users)")
    p.set_defaults(run=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    from . import diagnose

    given = diagnose.settings_from(args.setting)
    url = args.store or given.get("store")
    if not url:
        raise ConfigError("store", "give --store URL (or set SESSIONSTORE_STORE)")
    given.pop("store", None)
    print(f"sessionstore doctor: {diagnose.redact(url)}")
    checks = diagnose.run_doctor(url, given)
    _print_lines(diagnose.render_checks(checks))
    return 1 if any(c.level == "FAIL" for c in checks) else 0


# -- stats ----------------------------------------------------------------------------------------


def add_stats(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "stats",
        help="fetch a running app's session stats and print them as a table",
        description="GET a stats endpoint (diagnose.stats_app, JSON or Prometheus text) and print a table. "
                    "Exit 1 if it cannot be fetched or read.",
    )
    p.add_argument("--url", required=True, help="the stats endpoint, e.g. http://127.0.0.1:8000/_sessionstore/stats")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the stats as JSON instead of a table")
    p.set_defaults(run=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    from . import diagnose

    try:
        stats = diagnose.fetch_stats(args.url, timeout=args.timeout)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        print(f"sessionstore stats: cannot read {args.url}: {exc}", file=sys.stderr)
        return 1
    _print_lines([json.dumps(stats, indent=2, sort_keys=True)] if args.json else diagnose.render_stats(stats))
    return 0


# -- migrate --------------------------------------------------------------------------------------


def add_migrate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "migrate",
        help="create or update the tables of a SQL store (other stores need nothing)",
        description="Create the SQL store's tables if missing. Redis and memcached have no schema.",
    )
    _store_option(p)
    p.set_defaults(run=run_migrate)


def run_migrate(args: argparse.Namespace) -> int:
    from . import diagnose

    url = _require_store(args)
    try:
        diagnose.migrate(url)
    except StoreError as exc:
        print(f"sessionstore migrate: {diagnose.redact(url)}: {exc}", file=sys.stderr)
        return 1
    return 0


#: Every subcommand, in the order ``--help`` lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_demo, add_inspect, add_doctor, add_stats, add_migrate,
]
