"""A bridge relaying to two servers (`--grpc-target A,B`, bridge/pool.py), real processes.

- new connections are spread over both servers (least connections);
- SIGKILL one server under live streams: the connections it carried move to the other server's
  relay at once and resume their sessions there (sessions in Redis, server/store/sessions.py),
  with no reconnect by the client: the other server takes the dead one's streams over and
  continues them to the same text (`demo-cont`: continuation configured) or ends them with the
  typed error carrying the partial usage (`demo`). Never a connection left waiting for the dead
  server (that would end `unavailable` only after --reattach-timeout-s, 30 s here), never a token
  twice, never a cut stream reported done; the others finish exactly; new connections work;
  /readyz stays ready, until the last server is gone too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

from tests.support.procs import start_bridge, start_server
from tests.support.ws import open_ws, recv, send, start_frame, text_of

pytestmark = pytest.mark.timeout(180)

PACE = ("--demo-ttft-ms", "20", "--demo-tokens-per-s", "50", "--demo-jitter", "0", "--resume-grace-s", "30")
PROMPT = "Explain quantum computing"
CONTINUATION = "models:\n  demo-cont:\n    after_first_token: continue\n    deployments:\n      - {provider: demo, model: demo}\n"
TOKENS = 150  # 3 s at 50 tokens/s: live when the server is killed


def streams_ended(metrics_url: str) -> float:
    body = httpx.get(metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith("llmproxy_streams_total{"))


def gauge(metrics_url: str, name: str) -> float:
    body = httpx.get(metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name + " "))


async def read_direct(target: str, model: str) -> str:
    from llmproxy_client import LLMProxyClient

    async with LLMProxyClient(target) as client:
        handle = client.stream(model=model, messages=[{"role": "user", "content": PROMPT}], seed=5, max_tokens=TOKENS)
        return "".join([t async for t in handle])


def seqs_whole(frames: list[dict]) -> bool:
    """Every seq from 1 to the last exactly once (a merged token frame covers seq-count+1..seq)."""
    covered: list[int] = []
    for f in frames:
        if f.get("seq", 0) > 0:
            n = f.get("count", 1)
            covered.extend(range(f["seq"] - n + 1, f["seq"] + 1))
    return covered == list(range(1, len(covered) + 1))


@pytest.mark.parametrize("model", ["demo-cont", "demo"])
async def test_two_servers_spread_and_a_killed_servers_connections_move_to_the_other(redis_server, tmp_path, model):
    config = tmp_path / "continuation.yaml"
    config.write_text(CONTINUATION)
    servers = [
        start_server(*PACE, "--config", str(config), "--store", redis_server.url, "--metrics-listen", "127.0.0.1:0", "--server-id", f"s{i}")
        for i in range(2)
    ]
    bridge = None
    try:
        metrics = []
        for s in servers:
            prefix = "llmproxy-server metrics on "
            metrics.append(next(line[len(prefix):] for line in s.lines if line.startswith(prefix)))
        bridge = start_bridge(f"{servers[0].address},{servers[1].address}", "--reattach-timeout-s", "30")
        ws_url = bridge.address
        base = f"http://127.0.0.1:{bridge.port}"
        expected = await read_direct(servers[1].address, model)
        deadline = time.monotonic() + 10
        while httpx.get(base + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

        before = [streams_ended(u) for u in metrics]
        async with contextlib.AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(open_ws(ws_url)) for _ in range(6)]
            for i, ws in enumerate(sockets):
                await send(ws, start_frame(f"s{i}", PROMPT, model=model, seed=5, max_tokens=TOKENS))
            frames: list[list[dict]] = [[] for _ in sockets]
            for i, ws in enumerate(sockets):  # every stream is live: a few tokens each
                while sum(f["type"] == "token" for f in frames[i]) < 5:
                    frames[i].append(await recv(ws))
            # Both servers generate some of them (the least loaded link takes each new one).
            deadline = time.monotonic() + 5  # the gauge is set once a second
            while (live := [gauge(u, "llmproxy_active_streams") for u in metrics]) != [3.0, 3.0] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert live == [3.0, 3.0]

            servers[0].kill()
            killed_at = time.monotonic()
            outcomes: list[tuple[str, float]] = []
            for i, ws in enumerate(sockets):
                while True:
                    try:
                        f = await recv(ws, 20)
                    except Exception as exc:  # the socket closed after the error frame
                        close = getattr(getattr(exc, "rcvd", None), "code", None)
                        outcomes.append((f"closed {close}", time.monotonic() - killed_at))
                        break
                    frames[i].append(f)
                    if f["type"] == "done":
                        outcomes.append(("done", time.monotonic() - killed_at))
                        break
                    if f["type"] == "error":
                        outcomes.append((f"error {f['code']}", time.monotonic() - killed_at))
                        break
            kinds = [k for k, _ in outcomes]
            for i, (kind, after_s) in enumerate(outcomes):
                assert seqs_whole(frames[i]), str([(f["type"], f.get("seq"), f.get("count")) for f in frames[i]])
                assert after_s < 10, outcomes  # no connection waited for the dead server
                if kind == "done":
                    assert text_of(frames[i]) == expected  # whole, nothing lost or repeated
                else:
                    # taken over without continuation: the typed end with the partial usage
                    assert model == "demo" and kind == "error upstream_error", outcomes
                    end = frames[i][-1]
                    assert end["seq"] > 0 and end["usage"]["completion_tokens"] == sum(f.get("count", 1) for f in frames[i] if f["type"] == "token")
                    assert expected.startswith(text_of(frames[i])) and text_of(frames[i]) != expected
            if model == "demo-cont":
                assert kinds == ["done"] * 6, outcomes  # the three taken over were continued
            else:
                assert sorted(kinds) == ["done"] * 3 + ["error upstream_error"] * 3, outcomes
        done_here = streams_ended(metrics[1]) - before[1]
        assert done_here >= 3

        # The bridge stays ready on the surviving server, and new connections work there.
        assert httpx.get(base + "/readyz", timeout=5).status_code == 200
        async with open_ws(ws_url) as ws:
            await send(ws, start_frame("after", PROMPT, model=model, seed=5, max_tokens=TOKENS))
            got = []
            while not got or got[-1]["type"] not in ("done", "error"):
                got.append(await recv(ws, 20))
            assert got[-1]["type"] == "done" and text_of(got) == expected

        # With neither server, the bridge is not ready (load balancers send no one here).
        servers[1].kill()
        deadline = time.monotonic() + 10
        while httpx.get(base + "/readyz", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        if bridge is not None:
            bridge.stop()
        for s in servers:
            s.stop()
