"""Run a Node script from the tests: in its own process group, bounded in time.

The scripts under tests/browser/ print one JSON object as their last line of stdout; the tests
judge it. A script that hangs is killed with its whole group (a Chromium it started included).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

from tests.support.procs import ROOT


def run_node(args: list[str], timeout_s: float) -> dict[str, Any]:
    """Runs `node ARGS` from the repository root; returns the JSON object it prints last.
    Fails the test if node is missing, exits non-zero or runs longer than `timeout_s`."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (make install-test)")
    script = next((a for a in args if a.endswith((".mjs", ".js"))), args[0])
    proc = subprocess.Popen([node, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # node and any browser it started
        out, err = proc.communicate()
        pytest.fail(f"node {script} did not finish in {timeout_s}s\n{err}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a finished script (a stray browser)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"node {script} exited {proc.returncode}\n{err}"
    lines = out.strip().splitlines()
    assert lines, f"node {script} printed nothing\n{err}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


class NodeScript:
    """A Node script the test talks to while it runs: it prints JSON event lines (e.g.
    `{"event": "kill"}`) that the test waits for, and its result as the last line.
    Use as a context manager: leaving it kills the script's whole process group."""

    def __init__(self, args: list[str]) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not installed (make install-test)")
        self.script = next((a for a in args if a.endswith((".mjs", ".js"))), args[0])
        self.proc = subprocess.Popen(
            [node, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        self._stderr.extend(self.proc.stderr)

    def _next(self, deadline: float) -> dict[str, Any] | None:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"node {self.script}: nothing within the time limit\n{''.join(self._stderr)}")
        if line is None:
            return None
        return json.loads(line)  # type: ignore[no-any-return]

    def wait_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Blocks until the script prints `{"event": name, ...}`; returns that object."""
        deadline = time.monotonic() + timeout_s
        while True:
            obj = self._next(deadline)
            if obj is None:
                self.proc.wait(5)
                pytest.fail(f"node {self.script} exited {self.proc.returncode} before {name!r}\n{''.join(self._stderr)}")
            if obj.get("event") == name:
                return obj

    def result(self, timeout_s: float) -> dict[str, Any]:
        """The last JSON line, once the script has exited 0."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        while (obj := self._next(deadline)) is not None:
            last = obj
        self.proc.wait(max(0.1, deadline - time.monotonic()))
        assert self.proc.returncode == 0, f"node {self.script} exited {self.proc.returncode}\n{''.join(self._stderr)}"
        assert last is not None and "event" not in last, f"node {self.script} printed no result\n{''.join(self._stderr)}"
        return last

    def __enter__(self) -> NodeScript:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
