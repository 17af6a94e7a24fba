"""Per-request cost of the middleware, in-process, on the memory store.

Calls the WSGI apps directly (a test client's own overhead would hide the
middleware's) and prints the median over several rounds of the time per
request for:

- the bare app;
- wrapped, a request that never touches the session;
- wrapped, a read-only request on a ~2 KB session (reads one attribute);
- wrapped, a modifying request (in-place mutation of one attribute);
- wrapped, a read-only request touching one small attribute of a ~200 KB session.

Usage: python benchmarks/overhead.py [--rounds 7] [--requests 5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sessionstore import SessionMiddleware, get_session  # noqa: E402


def bare_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def session_app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/read":
        get_session(environ).get("user")
    elif path == "/write":
        get_session(environ)["counter"]["n"] += 1
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def _start_response(status, headers, exc_info=None):
    return None


def _environ(path: str, cookie: str | None) -> dict:
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    if cookie:
        environ["HTTP_COOKIE"] = f"session={cookie}"
    return environ


def _per_request(app, path: str, cookie: str | None, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        body = app(_environ(path, cookie), _start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close:
            close()
    return (time.perf_counter() - start) / n * 1e6


def _make_session(mw: SessionMiddleware, filler_bytes: int) -> str:
    manager = mw.manager
    from sessionstore.debug import RequestRecord

    session = manager.open(None, RequestRecord())
    session["user"] = "alice"
    session["counter"] = {"n": 0}
    chunk = "x" * 100
    for i in range(max(1, filler_bytes // 120)):
        session[f"attr{i}"] = {"v": chunk}
    outcome = manager.commit(session)
    return manager.signer.sign(outcome.session_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()

    mw = SessionMiddleware(session_app, secret_key="bench")
    small = _make_session(mw, 2_000)
    large = _make_session(mw, 200_000)
    rows = [
        ("bare app", bare_app, "/", None),
        ("wrapped, session untouched", mw, "/", small),
        ("wrapped, read-only (2 KB session)", mw, "/read", small),
        ("wrapped, modifying (2 KB session)", mw, "/write", small),
        ("wrapped, read-only (200 KB session)", mw, "/read", large),
    ]
    results: dict[str, float] = {}
    for label, app, path, cookie in rows:
        _per_request(app, path, cookie, 200)  # warm up
        samples = [_per_request(app, path, cookie, args.requests) for _ in range(args.rounds)]
        results[label] = statistics.median(samples)

    base = results["bare app"]
    print(f"{'request':40} {'us/request':>11} {'over bare':>10} {'ratio':>7}")
    for label, value in results.items():
        print(f"{label:40} {value:11.2f} {value - base:10.2f} {value / base:7.1f}")
    scale = results["wrapped, read-only (200 KB session)"] / results["wrapped, read-only (2 KB session)"]
    print(f"\nread-only 200 KB / 2 KB session: {scale:.2f} (target <= 1.5)")
    print(f"read-only over bare: {results['wrapped, read-only (2 KB session)'] - base:.1f} us (target < 30 us)")


if __name__ == "__main__":
    main()
