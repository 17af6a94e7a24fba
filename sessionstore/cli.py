"""The ``sessionstore`` command (also ``python -m sessionstore``).

One function per subcommand adds its parser and sets ``run``, the function
that does the work and returns the exit status::

    sessionstore demo [--host 127.0.0.1] [--port 8000] [--store memory://] [--selftest]
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import __version__
from .errors import ConfigError

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
        help="serve a small demo app with sessions (or check it with --selftest)",
        description="Serve a small WSGI app wrapped in SessionMiddleware, with debug output on.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on, 0 for any free one (default: %(default)s)")
    p.add_argument("--store", default="memory://", help="store URL (default: %(default)s)")
    p.add_argument("--selftest", action="store_true",
                   help="start the demo on a free port, walk through it with an HTTP client, exit 0 if all steps pass")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.selftest:
        return demo.selftest(store=args.store)
    return demo.serve(host=args.host, port=args.port, store=args.store)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


#: Every subcommand, in the order ``--help`` lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo]
