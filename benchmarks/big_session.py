"""Cost of reading a whole session with many small attributes (issue 14).

Builds two sessions of about the same serialized size (~950-966 kB, under the
default ``max_size``) through the WSGI app, on the memory store:

- *normal*: 10 attributes of ~96 kB each;
- *many*: 38,000 small attributes.

and times, inside requests, ``dict(session)`` (which also loads the session:
it is the request's first touch) and ``session.copy()``, plus the whole
request (its commit re-serializes every attribute it touched: the deep
dirty check). Times are CPU seconds of the thread (``time.thread_time``), the
median over ``--rounds`` requests, so other load on the machine moves them
little. Before the attribute table, each read of the many-attribute session
searched the whole index: 7.9 s per ``dict(session)``. Target: ``dict(session)``
on the many-attribute session at most 50x the normal one, measured in the
same run.

Usage: python benchmarks/big_session.py [--rounds 15] [--attributes 38000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sessionstore import SessionMiddleware, get_session  # noqa: E402

TARGET = 50.0
TOTAL_BYTES = 966_000


def _fill(count: int, value: Callable[[int], Any]) -> Callable[[Any], None]:
    def fill(session: Any) -> None:
        for i in range(count):
            session[f"k{i}"] = value(i)

    return fill


class _App:
    """A WSGI app whose one handler runs ``action(session)`` and times it (CPU)."""

    def __init__(self) -> None:
        self.action: Callable[[Any], Any] = lambda session: None
        self.took = 0.0

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        session = get_session(environ)
        started = time.thread_time()
        self.action(session)
        self.took = time.thread_time() - started
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


def _request(mw: SessionMiddleware, cookie: str | None) -> str | None:
    """One GET through the middleware; the session cookie it set (if any)."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http"}
    if cookie:
        environ["HTTP_COOKIE"] = f"session={cookie}"
    headers: list[tuple[str, str]] = []

    def start_response(status: str, response_headers: list, exc_info: Any = None) -> None:
        headers.extend(response_headers)

    body = mw(environ, start_response)
    for _chunk in body:
        pass
    body.close()
    cookies = [v.split(";")[0].split("=", 1)[1] for k, v in headers if k == "Set-Cookie"]
    return cookies[0] if cookies else cookie


def _measure(mw: SessionMiddleware, app: _App, cookie: str, action: Callable[[Any], Any],
             rounds: int) -> tuple[float, float]:
    """Median CPU ms of ``action`` inside a request, and of the whole request."""
    inner, whole = [], []
    app.action = action
    for _ in range(rounds):
        started = time.thread_time()
        _request(mw, cookie)
        whole.append(time.thread_time() - started)
        inner.append(app.took)
    return statistics.median(inner) * 1000, statistics.median(whole) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--attributes", type=int, default=38_000)
    args = parser.parse_args()

    app = _App()
    mw = SessionMiddleware(app, store="memory://", secret_key="bench")
    kinds = {
        "normal": (10, _fill(10, lambda i: "x" * (TOTAL_BYTES // 10 - 40))),
        "many": (args.attributes, _fill(args.attributes, lambda i: 1000 + i % 9000)),
    }
    rows = []
    for label, (count, fill) in kinds.items():
        app.action = fill
        cookie = _request(mw, None)  # built through the app: one request assigning every attribute
        key = mw.manager.key(mw.manager.signer.unsign(cookie))  # type: ignore[arg-type]
        size = len(mw.manager.store.load(key).data)  # type: ignore[union-attr]
        _measure(mw, app, cookie, dict, 2)  # warm up
        dict_ms, request_ms = _measure(mw, app, cookie, dict, args.rounds)
        copy_ms, _ = _measure(mw, app, cookie, lambda session: session.copy(), args.rounds)
        rows.append((label, count, size, dict_ms, copy_ms, request_ms))

    print(f"load average {os.getloadavg()[0]:.2f}; CPU ms, median of {args.rounds} requests each\n")
    print(f"{'session':8} {'attributes':>10} {'bytes':>9} {'dict(session)':>14} {'copy()':>9} {'request':>9}")
    for label, count, size, dict_ms, copy_ms, request_ms in rows:
        print(f"{label:8} {count:10,} {size:9,} {dict_ms:14.2f} {copy_ms:9.2f} {request_ms:9.2f}")
    ratio = rows[1][3] / rows[0][3]
    met = "yes" if ratio <= TARGET else "NO"
    print(f"\ndict(session), many / normal: {ratio:.1f}x (target <= {TARGET:.0f}x): {met}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
