"""Which process holds which TCP connection (Linux /proc), and ports for processes that share one.

`accepted(pid, port)` counts the established connections process `pid` accepted on local `port`:
the kernel's view, so a test sees how SO_REUSEPORT spread connections over processes without
asking any of them."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def accepted(pid: int, port: int) -> int:
    """Established TCP connections (IPv4 or IPv6) whose local port is `port`, held by `pid`."""
    inodes = _socket_inodes(pid)
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and int(fields[9]) in inodes:  # 01: ESTABLISHED
                count += 1
    return count


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of each direct child of `pid`."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_run(n: int, rng: random.Random | None = None, avoid: set[int] | None = None) -> int:
    """A port p such that p .. p+n-1 are free now (ports that several processes will bind by
    number, so port 0 cannot be used; another program may still take one meanwhile)."""
    rng = rng or random.Random()
    avoid = avoid or set()
    for _ in range(200):
        base = rng.randrange(20_000, 32_000)
        ports = range(base, base + n)
        if not avoid.intersection(ports) and all(_bindable(p) for p in ports):
            return base
    raise RuntimeError(f"no run of {n} free ports found")
