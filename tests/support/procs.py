"""Start the real server and bridge processes on ephemeral ports, and stop them.

Each process prints one ready line with its address; we read it, keep every later output line
(tests scan them for secrets), and stop the process with SIGTERM (SIGKILL after a timeout).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def relay_token_file() -> str:
    """The relay secret every test server and bridge share (one file per test run)."""
    path = Path(tempfile.gettempdir()) / f"llmproxy-test-relay-{os.getpid()}.token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)
    return str(path)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    address: str
    lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1].split("/", 1)[0])

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def start(name: str, args: list[str], ready: str, env: dict[str, str] | None = None, timeout_s: float = 30.0) -> Proc:
    """Starts `python -m <args>` and waits for a line starting with `ready`; returns what follows."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: list[str] = []
    found = threading.Event()
    address: list[str] = []

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            lines.append(line.rstrip("\n"))
            if not found.is_set() and line.startswith(ready):
                address.append(line[len(ready) :].strip())
                found.set()
        found.set()

    threading.Thread(target=pump, name=f"pump-{name}", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found.wait(0.05):
        if time.monotonic() > deadline:
            popen.kill()
            raise RuntimeError(f"{name} did not start in {timeout_s}s:\n" + "\n".join(lines))
    if not address:
        popen.wait(5)
        raise RuntimeError(f"{name} exited before it was ready:\n" + "\n".join(lines))
    return Proc(name, popen, address[0], lines)


def start_server(*extra: str, env: dict[str, str] | None = None) -> Proc:
    return start(
        "server",
        [
            "server.main",
            "--listen",
            "127.0.0.1:0",
            *(() if "--request-log" in extra else ("--request-log", "")),
            *(() if "--relay-token-file" in extra else ("--relay-token-file", relay_token_file())),
            *extra,
        ],
        "llmproxy-server listening on ",
        env,
    )


def start_bridge(grpc_target: str, *extra: str, port: int = 0, env: dict[str, str] | None = None) -> Proc:
    return start(
        "bridge",
        [
            "bridge.main",
            "--port",
            str(port),
            "--grpc-target",
            grpc_target,
            *(() if "--relay-token-file" in extra else ("--relay-token-file", relay_token_file())),
            *extra,
        ],
        "llmproxy-bridge listening on ",
        env,
    )


@dataclass
class Proxy:
    """A running server and bridge pair."""

    server: Proc
    bridge: Proc

    @property
    def grpc_target(self) -> str:
        return self.server.address

    @property
    def ws_url(self) -> str:
        return self.bridge.address

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.bridge.port}"

    @property
    def api_url(self) -> str:
        """The bridge's HTTP APIs (started with `--http-port`; it prints that line first)."""
        prefix = "llmproxy-bridge http on "
        return next(line[len(prefix) :].strip() for line in self.bridge.lines if line.startswith(prefix))

    def stop(self) -> None:
        self.bridge.stop()
        self.server.stop()

    def log_lines(self) -> list[str]:
        return self.server.lines + self.bridge.lines


def start_proxy(server_args: tuple[str, ...] = (), bridge_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Proxy:
    server = start_server(*server_args, env=env)
    try:
        bridge = start_bridge(server.address, *bridge_args, env=env)
    except BaseException:
        server.stop()
        raise
    return Proxy(server, bridge)
