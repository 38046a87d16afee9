"""Our own protocol over SSE (bridge/sse_transport.py), over real sockets: frames as events whose
ids resume a dropped event stream through Last-Event-ID, client frames as POSTs."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import FAST_DEMO
from tests.support.node import run_node
from tests.support.procs import start_proxy

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

START = {"type": "start", "id": "a", "model": "demo", "messages": [{"role": "user", "content": "Tell me about tides"}], "seed": 7, "max_tokens": 40}


@pytest.fixture(scope="module")
def chain():
    p = start_proxy(FAST_DEMO, ("--http-port", "0"))
    yield p
    p.stop()


def read_events(response: httpx.Response, until, into: list[tuple[int, dict]]) -> None:
    """Reads `id:`/`data:` events into `into` until `until(events)` is true or the stream ends."""
    event_id = None
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: ") and event_id is not None:
            into.append((event_id, json.loads(line[6:])))
            event_id = None
            if until(into):
                return


def text_of(events) -> str:
    return "".join(f.get("token", "") for _, f in events)


def run_stream(base: str, drop_after: int | None) -> tuple[list[tuple[int, dict]], int]:
    """One seeded stream; with `drop_after`, the event stream is closed after that many tokens and
    opened again with Last-Event-ID. Returns the events and how many GETs it took."""
    with httpx.Client(base_url=base, timeout=20) as http:
        sid = http.post("/sse").json()["session"]
        events: list[tuple[int, dict]] = []
        gets = 0
        finished = lambda evs: any(f["type"] in ("done", "error") and f.get("id") == "a" for _, f in evs)  # noqa: E731
        sent = False
        while not finished(events):
            headers = {"Last-Event-ID": str(events[-1][0])} if events else {}
            with http.stream("GET", f"/sse/{sid}", headers=headers) as r:
                gets += 1
                assert r.headers["content-type"].startswith("text/event-stream")
                if not sent:
                    assert http.post(f"/sse/{sid}", content=json.dumps(START)).status_code == 202
                    sent = True
                limit = drop_after if gets == 1 and drop_after is not None else None
                tokens = lambda evs: sum(f["type"] == "token" for _, f in evs)  # noqa: E731
                read_events(r, lambda evs: finished(evs) or (limit is not None and tokens(evs) >= limit), events)
        assert http.delete(f"/sse/{sid}", params={"end": "1"}).status_code == 204
    return events, gets


def test_sse_streams_and_resumes_a_dropped_event_stream_exactly(chain):
    whole, gets = run_stream(chain.api_url, None)
    assert gets == 1 and whole[0][1]["type"] == "session" and whole[-1][1]["type"] == "done"
    cut, gets = run_stream(chain.api_url, 5)
    assert gets == 2
    ids = [i for i, _ in cut]
    assert ids == list(range(1, len(ids) + 1))  # nothing lost, nothing repeated
    assert text_of(cut) == text_of(whole) and text_of(whole)


def test_client_frames_are_checked_and_answered_in_the_stream(chain):
    with httpx.Client(base_url=chain.api_url, timeout=20) as http:
        sid = http.post("/sse").json()["session"]
        assert http.post(f"/sse/{sid}", content=b"{nope").status_code == 202
        with http.stream("GET", f"/sse/{sid}") as r:
            events: list = []
            read_events(r, lambda evs: any(f["type"] == "error" for _, f in evs), events)
        assert events[-1][1]["code"] == "malformed_frame"
        assert http.get("/sse/not-a-session").status_code == 404
        assert http.delete(f"/sse/{sid}").status_code == 204
        assert http.post(f"/sse/{sid}", content=json.dumps(START)).status_code == 404


def test_a_resume_from_before_what_the_bridge_kept_is_expired(chain):
    with httpx.Client(base_url=chain.api_url, timeout=20) as http:
        sid = http.post("/sse").json()["session"]
        with http.stream("GET", f"/sse/{sid}", headers={"Last-Event-ID": "99"}) as r:
            body = r.read().decode()
        assert '"code":"expired"' in body and "event: close" in body


def test_sse_from_a_foreign_origin_is_refused(chain):
    r = httpx.post(chain.api_url + "/sse", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    r = httpx.options(chain.api_url + "/sse", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403


# -- the JavaScript client in Chromium, WebSockets refused ----------------------------------------

PACE = ("--demo-ttft-ms", "50", "--demo-tokens-per-s", "50", "--demo-jitter", "0")
SPEC = {"prompt": "What is a black hole?", "seed": 11, "max_tokens": 40, "drop_after": 8}


async def read_direct(grpc_target: str) -> str:
    from llmproxy_client import LLMProxyClient

    async with LLMProxyClient(grpc_target) as client:
        handle = client.stream(model="demo", messages=[{"role": "user", "content": SPEC["prompt"]}], seed=SPEC["seed"], max_tokens=SPEC["max_tokens"])
        return "".join([t async for t in handle])


@pytest.mark.browser
async def test_js_client_falls_back_to_sse_when_websockets_are_refused(proxy_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing (make install-test installs Debian's chromium)")
    p = proxy_factory(server_args=PACE, bridge_args=("--http-port", "0"))
    r = await asyncio.to_thread(run_node, ["tests/browser/sse_fallback.mjs", p.http_url, p.api_url, json.dumps(SPEC)], 90)
    expected = await read_direct(p.grpc_target)
    assert r["pageErrors"] == [] and r["webSockets"] == 0
    assert r["transport"] == "sse" and r["transportAfter"] == "sse"
    assert r["wholeDone"] == "length" and r["whole"] == expected
    # A dropped event stream: reopened after the last event id, the exact text.
    assert r["eventStreams"] == 2 and r["dropped"] == expected and r["droppedDuplicates"] == 0
    # A dropped connection: the session resumed over a new SSE session, the exact text.
    assert r["reconnects"] == 1 and r["sameSession"] and r["resumed"] == expected
    assert r["cancelled"] == "cancelled" and r["cancelledTokens"] < 20
    assert r["state"] == "closed"
