"""A memcached ring whose nodes sit behind links that can be cut: Linux network namespaces.

:func:`start_netns_ring` builds, for one test run (names carry the pid and
a random tag, so parallel runs never meet)::

    clients namespace  ``<tag>c``    vn1 10.213.1.1/30 ── veth0 10.213.1.2  namespace ``<tag>n1``: memcached
                                      vn2 10.213.2.1/30 ── veth0 10.213.2.2  namespace ``<tag>n2``: memcached
                                      ...

Every address lives inside these namespaces (none in the host's), and the
nodes' namespaces only reach the clients' one. :meth:`NetnsRing.partition`
takes a node's end of its link down: packets to it are dropped (connects and
requests time out, as in a real partition), and the node keeps running with
all its data; :meth:`NetnsRing.heal` brings the link up again. Processes in
the clients namespace are started with :meth:`NetnsRing.spawn`.

Needs root and ``ip`` (iproute2). A namespace that cannot be created fails the
test with the command and its error; it never skips it. :meth:`NetnsRing.stop`
stops every process by pid, then deletes the namespaces (their links go with
them); it also runs at exit, so a crashed run leaves nothing behind.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .process import die_with_parent, require_binary

__all__ = ["NetnsError", "NetnsNode", "NetnsRing", "start_netns_ring"]

MEMCACHED_PORT = 11211
_SUBNET = "10.213"


class NetnsError(RuntimeError):
    """An ``ip`` command failed: the message names the command and its error."""


def _ip(*args: str) -> None:
    argv = [shutil.which("ip") or "/usr/sbin/ip", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc`` by its pid, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


@dataclass
class NetnsNode:
    """One memcached in a namespace of its own, reached at ``address``:11211."""

    index: int
    namespace: str
    address: str
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The node's name in the store (``host:port``)."""
        return f"{self.address}:{MEMCACHED_PORT}"


@dataclass
class NetnsRing:
    """memcached nodes behind cuttable links, and the clients namespace that reaches them."""

    tag: str
    workdir: Path
    clients: str = ""
    nodes: list[NetnsNode] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)
    namespaces: list[str] = field(default_factory=list)

    def url(self, **options: object) -> str:
        """``memcached://`` URL of the ring, with extra query ``options``."""
        query = "&".join(f"{name}={value}" for name, value in options.items())
        return "memcached://" + ",".join(node.name for node in self.nodes) + ("?" + query if query else "")

    def spawn(self, argv: list[str], name: str, cwd: Path | None = None, namespace: str | None = None,
              stdin: int | None = None, stdout: int | None = None) -> subprocess.Popen:
        """Start ``argv`` in the clients namespace (or ``namespace``), stderr to ``workdir/<name>.log``.

        ``ip netns exec`` execs the command, so the pid is the command's own; it dies
        with the thread that started it (``PR_SET_PDEATHSIG``) and is stopped by pid.
        """
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", namespace or self.clients, *argv],
                cwd=cwd, stdin=stdin, stdout=log if stdout is None else stdout, stderr=log,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        self.procs.append(proc)
        return proc

    def partition(self, node: NetnsNode) -> None:
        """Take ``node``'s end of its link down: everything sent to it is dropped, its data stays."""
        _ip("-n", node.namespace, "link", "set", "veth0", "down")

    def heal(self, node: NetnsNode) -> None:
        """Bring ``node``'s link up again."""
        _ip("-n", node.namespace, "link", "set", "veth0", "up")

    def wait_reachable(self, timeout: float = 20.0) -> None:
        """Until every node accepts a connection from the clients namespace."""
        probe = ("import socket, sys, time\n"
                 "deadline = time.monotonic() + float(sys.argv[1])\n"
                 "for host in sys.argv[2:]:\n"
                 "    while True:\n"
                 "        try:\n"
                 f"            socket.create_connection((host, {MEMCACHED_PORT}), timeout=0.5).close()\n"
                 "            break\n"
                 "        except OSError:\n"
                 "            if time.monotonic() > deadline:\n"
                 "                sys.exit(f'{host} unreachable')\n"
                 "            time.sleep(0.05)\n")
        proc = self.spawn([sys.executable, "-c", probe, str(timeout), *(n.address for n in self.nodes)], "probe")
        if proc.wait(timeout + 10) != 0:
            raise RuntimeError(f"memcached nodes not reachable in their namespaces; see {self.workdir}/probe.log")

    def stop(self) -> None:
        """Stop every process by pid, then delete the namespaces (idempotent)."""
        for proc in reversed(self.procs):
            _stop(proc)
        self.procs.clear()
        for namespace in reversed(self.namespaces):
            try:
                _ip("netns", "del", namespace)
            except NetnsError:
                pass  # already gone
        self.namespaces.clear()


def _build(ring: NetnsRing, size: int) -> None:
    ring.clients = f"{ring.tag}c"
    _ip("netns", "add", ring.clients)
    ring.namespaces.append(ring.clients)
    _ip("-n", ring.clients, "link", "set", "lo", "up")
    for i in range(1, size + 1):
        node = NetnsNode(i, f"{ring.tag}n{i}", f"{_SUBNET}.{i}.2")
        _ip("netns", "add", node.namespace)
        ring.namespaces.append(node.namespace)
        _ip("link", "add", f"vn{i}", "netns", ring.clients, "type", "veth", "peer", "name", "veth0",
            "netns", node.namespace)
        _ip("-n", ring.clients, "addr", "add", f"{_SUBNET}.{i}.1/30", "dev", f"vn{i}")
        _ip("-n", ring.clients, "link", "set", f"vn{i}", "up")
        _ip("-n", node.namespace, "addr", "add", f"{node.address}/30", "dev", "veth0")
        _ip("-n", node.namespace, "link", "set", "lo", "up")
        _ip("-n", node.namespace, "link", "set", "veth0", "up")
        argv = [require_binary("memcached"), "-l", node.address, "-p", str(MEMCACHED_PORT),
                "-U", "0", "-m", "32", "-t", "2"]
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # keeping the uid keeps PR_SET_PDEATHSIG (see memcached_fixtures)
        node.proc = ring.spawn(argv, f"memcached-n{i}", namespace=node.namespace)
        ring.nodes.append(node)


def start_netns_ring(workdir: Path, size: int = 3) -> NetnsRing:
    """``size`` memcached nodes, each in a namespace linked to a shared clients namespace.

    Node ``i`` is at ``10.213.<i>.2``, so node names sort in ring order.
    Everything created is removed again if a step fails.
    """
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (`ip netns add` fails with 'Permission denied')")
    ring = NetnsRing(f"ss{os.getpid() % 100000}{secrets.token_hex(2)}", workdir)
    atexit.register(ring.stop)
    try:
        _build(ring, size)
        ring.wait_reachable()
    except BaseException:
        ring.stop()
        raise
    return ring

