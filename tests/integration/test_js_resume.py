"""The JavaScript client (clients/js/llmproxy.js) survives the network, in Node and in Chromium.

The bridge is killed with SIGKILL in the middle of three seeded streams and started again on
the same port (or not: the client then resumes through a second bridge from its URL list); each
final text must equal the text of an uninterrupted run exactly, with no frame delivered twice.
`modify` restarts generation within one token interval; `close()` ends the session on the server.
The scripts are tests/browser/js_resume.mjs, js_session.mjs and resume_page.mjs.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import grpc
import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from llmproxy_client import WSClient
from tests.support.node import NodeScript, run_node
from tests.support.procs import ROOT, start_bridge, start_server

# 100 tokens/s: a 400-token stream runs 4 s, longer than a bridge restart takes.
PACE = ("--demo-ttft-ms", "30", "--demo-tokens-per-s", "100", "--demo-jitter", "0.2", "--resume-grace-s", "10")
PROMPTS = {"q": "Explain quantum computing", "p": "How does photosynthesis work?", "b": "What is a black hole?"}
SEED, MAX_TOKENS, KILL_AFTER = 11, 400, 30
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = ROOT / "tests" / "artifacts" / "resume.png"
NODE = ["--experimental-websocket"]


def spec(kill_after: int | None = KILL_AFTER) -> str:
    return json.dumps({"streams": PROMPTS, "seed": SEED, "max_tokens": MAX_TOKENS, "kill_after": kill_after, "backoff_ms": 50})


@pytest.fixture(scope="module")
def server():
    s = start_server(*PACE)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(server) -> dict[str, str]:
    """The uninterrupted run, by the same script, through a bridge nobody touches."""
    bridge = start_bridge(server.address)
    try:
        r = run_node([*NODE, "tests/browser/js_resume.mjs", json.dumps([bridge.address]), spec(None)], 60)
    finally:
        bridge.stop()
    assert r["reconnects"] == 0 and all(s["finish"] == "length" for s in r["streams"].values()), r
    return {sid: s["text"] for sid, s in r["streams"].items()}


def judge(r: dict, expected: dict[str, str]) -> None:
    """Every stream finished whole: the uninterrupted text, nothing twice, seqs to the end."""
    assert r["reconnects"] >= 1, r["states"]
    assert ["open", "reconnecting"] in r["states"] and r["states"][-1] == ["closing", "closed"], r["states"]
    resumed = [s for s in r["sessions"] if s["resumed"]]
    assert resumed and all(s["session_id"] == r["session"]["session_id"] for s in resumed), r["sessions"]
    for sid, want in expected.items():
        s = r["streams"][sid]
        assert s["status"] == "fulfilled" and s["finish"] == "length", s
        assert s["duplicates"] == 0
        assert s["text"] == want, (sid, len(s["text"]), len(want))
        assert s["lastSeq"] == MAX_TOKENS + 2  # started + every token + done: nothing skipped
    # The kill really came in the middle: no stream had finished when the bridge died.
    assert all(0 < seq < MAX_TOKENS for seq in r["killAtLastSeq"].values()), r["killAtLastSeq"]


def test_node_client_resumes_after_the_bridge_is_killed_and_restarted(server, expected):
    bridge = start_bridge(server.address)
    port = bridge.port
    try:
        with NodeScript([*NODE, "tests/browser/js_resume.mjs", json.dumps([bridge.address]), spec()]) as node:
            node.wait_event("kill", 30)
            bridge.kill()  # SIGKILL: no close frames, no cleanup
            node.wait_event("reconnecting", 10)  # the client saw it gone; now it comes back
            bridge = start_bridge(server.address, port=port)
            r = node.result(45)
    finally:
        bridge.stop()
    judge(r, expected)


def test_node_client_resumes_through_the_second_bridge(server, expected):
    b1, b2 = start_bridge(server.address), start_bridge(server.address)
    try:
        with NodeScript([*NODE, "tests/browser/js_resume.mjs", json.dumps([b1.address, b2.address]), spec()]) as node:
            node.wait_event("kill", 30)
            b1.kill()  # and it stays dead
            r = node.result(45)
    finally:
        b1.stop()
        b2.stop()
    judge(r, expected)
    assert r["url"] == b2.address


def test_node_client_fails_streams_with_expired_after_the_grace_period():
    s = start_server("--demo-ttft-ms", "30", "--demo-tokens-per-s", "100", "--resume-grace-s", "0.3")
    bridge = start_bridge(s.address)
    port = bridge.port
    one = json.dumps({"streams": {"x": "Explain quantum computing"}, "seed": SEED, "max_tokens": MAX_TOKENS, "kill_after": 5, "backoff_ms": 50})
    try:
        with NodeScript([*NODE, "tests/browser/js_resume.mjs", json.dumps([bridge.address]), one]) as node:
            session = node.wait_event("kill", 30)["session"]
            bridge.kill()
            node.wait_event("reconnecting", 10)
            # The bridge comes back only once the server has expired the session (grace 0.3 s).
            wait_session_gone(s.address, session, 5)
            bridge = start_bridge(s.address, port=port)
            r = node.result(45)
    finally:
        bridge.stop()
        s.stop()
    x = r["streams"]["x"]
    assert x["status"] == "rejected" and x["code"] == "expired", x
    assert r["finalSession"] != r["session"]["session_id"], "a fresh session replaces the expired one"


def wait_session_gone(target: str, session: dict, timeout_s: float) -> None:
    """Polls GetSession until the server no longer has the session; fails after the deadline."""
    deadline = time.monotonic() + timeout_s
    while (state := asyncio.run(get_session(target, session))) != grpc.StatusCode.NOT_FOUND:
        assert time.monotonic() < deadline, f"the session outlived its grace period: {state}"
        time.sleep(0.02)  # poll interval


async def get_session(target: str, session: dict) -> pb.SessionState | grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            return await pb_grpc.LLMProxyStub(channel).GetSession(
                pb.GetSessionRequest(session_id=session["session_id"], resume_token=session["resume_token"])
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()


async def test_modify_restarts_within_one_token_interval_and_close_ends_the_session():
    # 50 ms per token, no jitter: "within one token interval" is < 50 ms.
    s = start_server("--demo-ttft-ms", "30", "--demo-tokens-per-s", "20", "--demo-jitter", "0")
    bridge = start_bridge(s.address)
    try:
        r = await asyncio.to_thread(run_node, [*NODE, "tests/browser/js_session.mjs", bridge.address], 60)
        deadline = time.monotonic() + 3  # the bridge ends the session as the socket closes
        while (gone := await get_session(s.address, r["closedSession"])) != grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        alive = await get_session(s.address, r["droppedSession"])
    finally:
        bridge.stop()
        s.stop()

    # Dropped without keep_partial: the old partial answer is gone, the new one starts fresh.
    m = r["modify"]
    assert m["restartedMs"] < 50, m
    assert m["tokensBetween"] == 0, "no token of the old generation after the modify was answered"
    assert m["textBefore"].startswith("Quantum computing") and m["tokensBefore"] >= 5
    assert m["text"].startswith("A black hole is a region") and "Quantum" not in m["text"], m["text"]
    assert m["finish"] == "done" and m["seqsIncreasing"] and m["restarts"] == 1
    # keep_partial: the partial answer stays and the amended generation follows it.
    k = r["keep"]
    assert k["keepPartial"] is True and k["text"].startswith(k["textBefore"]) and len(k["text"]) > len(k["textBefore"])

    # close() (code 1000) ended the session: GetSession no longer finds it, while a dropped
    # connection (code 4000) left its session resumable.
    assert r["closedStream"] == "client_closed"
    assert gone == grpc.StatusCode.NOT_FOUND, gone
    assert isinstance(alive, pb.SessionState), alive


@pytest.mark.browser
async def test_chromium_client_and_demo_page_resume_after_the_bridge_is_killed(server, expected):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing (make install-test installs Debian's chromium)")
    if not (ROOT / "clients/js/node_modules/playwright-core").is_dir():
        pytest.fail("playwright-core is missing: make install-test (npm install in clients/js)")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    pane_prompts = ["What is a black hole?", "How do vaccines work?"]
    bridge = start_bridge(server.address)
    port = bridge.port
    try:
        async with WSClient(bridge.address, reconnect=False) as ws:  # the demo page's answers, uninterrupted
            handles = [ws.stream(model="demo", messages=[{"role": "user", "content": p}], seed=SEED) for p in pane_prompts]
            pane_expected = ["".join([t async for t in h]) for h in handles]
        args = ["tests/browser/resume_page.mjs", f"http://127.0.0.1:{port}/", spec(), json.dumps(pane_prompts), str(SCREENSHOT)]
        with NodeScript(args) as node:
            await asyncio.to_thread(node.wait_event, "kill", 40)
            bridge.kill()
            await asyncio.to_thread(node.wait_event, "reconnecting", 15)  # the page and its client saw it gone
            bridge = start_bridge(server.address, port=port)
            r = await asyncio.to_thread(node.result, 60)
    finally:
        bridge.stop()

    assert r["ok"], r.get("failure")
    assert r["pageErrors"] == [], r["pageErrors"]
    judge(r["client"], expected)  # the client itself, running in the page
    # The demo page: the badge said so, and both panes ended with the uninterrupted answers.
    assert "reconnecting" in r["badges"] and r["badges"][-1] == "open", r["badges"]
    assert r["panes"] == pane_expected, [len(t) for t in r["panes"]]
    assert r["paneStates"] == ["done", "done"], r["paneStates"]
    # Edit while streaming: the page sent `modify` and shows only the amended answer.
    assert r["edit"]["sentModify"], r["edit"]
    assert r["edit"]["answer"].startswith("A black hole is a region"), r["edit"]["answer"][:80]
    assert SCREENSHOT.stat().st_size > 10_000
