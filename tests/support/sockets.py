"""What a server process holds open, from ``/proc`` (Linux): descriptors and TCP sockets."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

__all__ = [
    "TcpSocket",
    "open_descriptors",
    "process_sockets",
    "server_connections",
    "settle",
    "tcp_sockets",
]

T = TypeVar("T")

# The st field of /proc/net/tcp (include/net/tcp_states.h).
_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


class TcpSocket:
    """One row of ``/proc/net/tcp``: local and remote ports, state, inode."""

    __slots__ = ("inode", "local_port", "remote_port", "state")

    def __init__(self, local_port: int, remote_port: int, state: str, inode: int) -> None:
        self.local_port = local_port
        self.remote_port = remote_port
        self.state = state
        self.inode = inode

    def __repr__(self) -> str:
        return f"<{self.state} :{self.local_port} <-> :{self.remote_port}>"


def tcp_sockets() -> list[TcpSocket]:
    """Every TCP socket of this network namespace (IPv4 and IPv6)."""
    rows: list[TcpSocket] = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as table:
                lines = table.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            rows.append(
                TcpSocket(
                    int(local.rsplit(":", 1)[1], 16),
                    int(remote.rsplit(":", 1)[1], 16),
                    _STATES.get(state, state),
                    int(inode),
                )
            )
    return rows


def server_connections(port: int) -> list[TcpSocket]:
    """The server side of the connections clients opened to ``port`` (the listener excluded),
    whichever process holds them; a socket closed by both ends (TIME_WAIT, inode 0) is not
    held by anyone and is left out."""
    return [
        s for s in tcp_sockets() if s.local_port == port and s.state != "LISTEN" and s.inode != 0
    ]


def _descriptors(pid: int) -> Iterator[str]:
    """What each open descriptor of process ``pid`` points to (``socket:[inode]``, a path)."""
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            yield os.readlink(f"{directory}/{name}")
        except FileNotFoundError:  # closed meanwhile
            continue


def process_sockets(pid: int) -> list[TcpSocket]:
    """The TCP sockets process ``pid`` holds."""
    inodes = {int(t[8:-1]) for t in _descriptors(pid) if t.startswith("socket:[")}
    return [s for s in tcp_sockets() if s.inode in inodes]


def open_descriptors(pid: int) -> Counter[str]:
    """The open descriptors of process ``pid`` by kind: ``socket``, ``pipe``, ``file``, ...;
    ``total`` counts them all."""
    kinds: Counter[str] = Counter()
    for target in _descriptors(pid):
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
        kinds[kind] += 1
        kinds["total"] += 1
    return kinds


def settle(probe: Callable[[], T], done: Callable[[T], bool], within: float) -> T:
    """Call ``probe`` until ``done`` holds for its result or ``within`` seconds have passed;
    return the last result."""
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if done(result) or time.monotonic() >= deadline:
            return result
        time.sleep(0.05)
