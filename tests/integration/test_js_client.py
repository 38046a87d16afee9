"""The JavaScript client (clients/js/llmproxy.js) in Node against the real bridge.

tests/browser/js_client.mjs runs three seeded streams at once on one socket, cancels one after
ten tokens, then starts a stream on an unknown model; it prints what it saw and this test judges
it against a direct gRPC read of the same seeded requests.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from llmproxy_client import LLMProxyClient
from tests.support.node import run_node

PACE = ("--demo-ttft-ms", "50", "--demo-tokens-per-s", "20", "--demo-jitter", "0")  # 50 ms per token
PROMPTS = {"q": "Explain quantum computing", "p": "How does photosynthesis work?", "b": "What is a black hole?"}
SEED = 3
MAX_TOKENS = 60
CANCEL_ID, CANCEL_AFTER = "p", 10


async def read_direct(grpc_target: str) -> dict[str, str]:
    """The same seeded requests read straight from the gRPC service, without the bridge."""
    async with LLMProxyClient(grpc_target) as client:
        async def text(prompt: str) -> str:
            handle = client.stream(model="demo", messages=[{"role": "user", "content": prompt}], seed=SEED, max_tokens=MAX_TOKENS)
            return "".join([t async for t in handle])

        texts = await asyncio.gather(*(text(prompt) for prompt in PROMPTS.values()))
    return dict(zip(PROMPTS, texts))


async def test_js_client_multiplexes_cancels_and_raises_typed_errors(proxy_factory):
    p = proxy_factory(server_args=PACE)
    spec = {"streams": PROMPTS, "cancel": CANCEL_ID, "cancel_after": CANCEL_AFTER, "seed": SEED, "max_tokens": MAX_TOKENS}
    r = await asyncio.to_thread(
        run_node, ["--experimental-websocket", "tests/browser/js_client.mjs", p.ws_url, json.dumps(spec)], 90
    )
    direct = await read_direct(p.grpc_target)

    assert r["states"] == [["idle", "connecting"], ["connecting", "open"], ["open", "closing"], ["closing", "closed"]]
    assert 0 < r["rttMs"] < 5000

    # The three streams interleaved on the one socket rather than ran one after another.
    order = r["order"][: 3 * CANCEL_AFTER]
    assert sum(1 for a, b in zip(order, order[1:]) if a != b) >= 15, order

    # The cancelled stream stopped: `done` with cancelled, nothing after it, a prefix of the whole.
    c = r["streams"][CANCEL_ID]
    assert c["status"] == "fulfilled" and c["state"] == "done"
    assert c["done"]["finish_reason"] == "cancelled"
    assert c["tokensAfterCancel"] <= 1, "at most the token already in flight"
    assert c["cancelToDoneMs"] < 1000
    assert c["frames"][-1]["type"] == "done" and c["lastSeq"] == c["done"]["seq"]
    assert direct[CANCEL_ID].startswith(c["text"]) and len(c["text"]) < len(direct[CANCEL_ID])

    # The other two finished whole: the same text as the direct gRPC read, seqs without gaps.
    for sid in PROMPTS.keys() - {CANCEL_ID}:
        s = r["streams"][sid]
        assert s["status"] == "fulfilled" and s["done"]["finish_reason"] == "length"
        assert s["text"] == direct[sid] and direct[sid]
        seqs = [f["seq"] for f in s["frames"]]
        counts = [f["count"] for f in s["frames"]]
        assert seqs[0] == 1 and all(b == a + n for a, b, n in zip(seqs, seqs[1:], counts[1:])), seqs
        assert s["done"]["usage"]["completion_tokens"] == MAX_TOKENS
    assert r["iteratedText"] == r["streams"][r["iteratedId"]]["text"], "async iteration and callbacks agree"

    # An error frame rejects `done` with a typed error; the stream is never reported as finished.
    e = r["error"]
    assert e["resolved"] is False, e
    assert e["isLLMProxyError"] and e["name"] == "LLMProxyError"
    assert e["code"] == "unknown_model" and "no-such-model" in e["detail"]
    assert e["retryable"] is False and e["retryAfterMs"] is None and e["streamId"]
    assert e["state"] == "failed" and e["iterationThrew"]

    # The connection stays usable; a duplicate live id is refused; close() fails live streams.
    assert r["afterError"]["finish"] == "length" and r["afterError"]["text"].startswith("A black hole is")
    assert r["duplicate"] == "duplicate_stream_id"
    assert r["closedStream"] == "client_closed"
