"""The `llmproxy` command (issue 18.4): subcommands for serve, bridge, keys, stats, and `chat`,
which streams an answer with per-token timing; Ctrl-C stops the stream (the server cancels it).

Run as `python -m llmproxy_cli` (what the `llmproxy` console script calls) from the repository
root, with clients/python first on the path so the client in this checkout is the one tested.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid

import pytest

from tests.support.procs import ROOT, relay_token_file, start, start_server

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "clients" / "python"), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
SUMMARY = re.compile(r"^\[(\w+) · (\S+) · ttft (\d+) ms · (\d+) tokens · ([\d.]+) tok/s", re.M)


def llmproxy(*args: str, timeout_s: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmproxy_cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout_s, input=input)


@pytest.fixture(scope="module")
def slow_server():
    """20 tokens/s: a 2000-token answer runs for minutes unless it is stopped."""
    s = start_server("--demo-ttft-ms", "20", "--demo-tokens-per-s", "20", "--demo-jitter", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fast_server():
    s = start_server("--demo-ttft-ms", "20", "--demo-tokens-per-s", "300")
    yield s
    s.stop()


def test_the_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["llmproxy"] == "llmproxy_cli.main:main"


def test_usage_lists_every_subcommand_and_each_has_its_own_help():
    proc = llmproxy("--help")
    assert proc.returncode == 0
    for name in ("serve", "bridge", "keys", "stats", "chat"):
        assert re.search(rf"^  {name} ", proc.stdout, re.M), proc.stdout
        sub = llmproxy(name, "--help")
        assert sub.returncode == 0 and "usage:" in sub.stdout, (name, sub.stdout, sub.stderr)
    assert llmproxy("frobnicate").returncode == 2


def test_keys_and_stats(tmp_path):
    db = str(tmp_path / "keys.sqlite3")
    created = llmproxy("keys", "create", "--db", db, "--name", "ci", "--rpm", "5")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    listed = llmproxy("keys", "list", "--db", db)
    assert listed.returncode == 0 and "name='ci'" in listed.stdout and key not in listed.stdout
    log = str(tmp_path / "log.sqlite3")
    server = start_server("--request-log", log, "--demo-ttft-ms", "5", "--demo-tokens-per-s", "0")
    try:
        chat = llmproxy("chat", "--target", server.address, "--max-tokens", "5", "hi")
        assert chat.returncode == 0, chat.stderr
    finally:
        server.stop()
    stats = llmproxy("stats", "--db", log, "--group-by", "deployment")
    assert stats.returncode == 0 and re.search(r"^demo\s+1\s", stats.stdout, re.M), stats.stdout


def test_serve_and_bridge_subcommands_start_the_processes():
    server = start("server", ["llmproxy_cli", "serve", "--listen", "127.0.0.1:0", "--request-log", "", "--relay-token-file", relay_token_file()], "llmproxy-server listening on ", ENV)
    try:
        bridge = start("bridge", ["llmproxy_cli", "bridge", "--port", "0", "--grpc-target", server.address, "--relay-token-file", relay_token_file()], "llmproxy-bridge listening on ", ENV)
        try:
            assert bridge.address.startswith("ws://127.0.0.1:")
            # Ready for real once /readyz answers 200 (its relay call is up). Also: bridge.main
            # prints its ready line just before installing its SIGTERM handler, so a SIGTERM
            # sent at once can kill it with -15; any answer means the handler is in place.
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{bridge.port}/readyz", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the bridge never became ready"
                time.sleep(0.05)
        finally:
            assert bridge.stop() == 0
    finally:
        assert server.stop() == 0


def test_chat_streams_an_answer_with_per_token_timing(fast_server):
    proc = llmproxy("chat", "--per-token", "--target", fast_server.address, "--max-tokens", "10", "Explain gRPC")
    assert proc.returncode == 0, proc.stderr
    token_lines = re.findall(r"^\s+([\d.]+) ms  \(server\s+([\d.]+) ms\)  '", proc.stdout, re.M)
    assert len(token_lines) == 10, proc.stdout
    finish, deployment, ttft_ms, tokens, _ = SUMMARY.search(proc.stdout).groups()
    assert (finish, deployment, tokens) == ("length", "demo", "10")
    assert float(token_lines[0][0]) >= float(token_lines[0][1]) * 0.5  # the client's gap includes the server's


def test_ctrl_c_stops_the_stream(slow_server):
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmproxy_cli", "chat", "--per-token", "--target", slow_server.address, "--max-tokens", "2000", "Tell a long story"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]  # three tokens have been shown
        assert all(" ms  (server" in line for line in lines), lines
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    finish, _, _, tokens, _ = SUMMARY.search(out).groups()
    assert finish == "cancelled" and 3 <= int(tokens) < 200, out


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make install-test)")
def test_chat_in_a_terminal_ctrl_c_stops_the_answer_and_keeps_the_chat(slow_server):
    """Typed in a real terminal (tmux): a question, Ctrl-C mid-answer (back to the prompt), then a
    second question answered in full, then Ctrl-C at the prompt leaves."""
    session = f"llmproxy-chat-{uuid.uuid4().hex[:8]}"
    pythonpath = ENV["PYTHONPATH"]
    command = f"cd {ROOT} && PYTHONPATH={pythonpath} {sys.executable} -m llmproxy_cli chat --target {slow_server.address} --max-tokens 2000; echo EXIT=$?; sleep 30"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"], capture_output=True, text=True).stdout

    def wait_for(pattern: str, timeout_s: float = 20) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = screen()
            if re.search(pattern, text, re.M):
                return text
            time.sleep(0.1)
        pytest.fail(f"{pattern!r} not on the screen:\n{screen()}")

    try:
        wait_for(r"^you>")
        subprocess.run(["tmux", "send-keys", "-t", session, "Tell a long story", "Enter"], check=True)
        wait_for(r"Tell a long story\n\S+ \S+ \S+")  # a few words of the answer are on the screen
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        text = wait_for(r"^\[cancelled · demo · ttft \d+ ms · \d+ tokens")
        assert re.search(r"^you>\s*$", text.split("[cancelled", 1)[1], re.M), text  # the prompt again
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        wait_for(r"^EXIT=0$")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_chat_names_an_unreachable_server_or_an_unknown_model_at_once(fast_server):
    started = time.monotonic()
    unreachable = llmproxy("chat", "--target", "127.0.0.1:1", "hi", timeout_s=30)
    assert unreachable.returncode == 1 and "cannot reach 127.0.0.1:1" in unreachable.stderr, unreachable.stderr
    assert time.monotonic() - started < 15  # not the reconnect loop's minutes
    unknown = llmproxy("chat", "--target", fast_server.address, "--model", "nope", "hi")
    assert unknown.returncode == 1 and "'nope' is not served here; models: demo" in unknown.stderr, unknown.stderr
