"""Several streams on one WebSocket: they interleave, and cancelling one leaves the others whole."""

from __future__ import annotations

import time


from tests.support.ws import open_ws, collect, recv, send, start_frame, text_of

PROMPTS = {"q": "Explain quantum computing", "p": "How does photosynthesis work?", "b": "What is a black hole?"}
PACE = ("--demo-ttft-ms", "50", "--demo-tokens-per-s", "20", "--demo-jitter", "0")  # 50 ms per token


async def run_alone(ws_url: str, sid: str, prompt: str) -> str:
    async with open_ws(ws_url) as ws:
        await send(ws, start_frame(sid, prompt, seed=3))
        return text_of((await collect(ws, {sid}))[sid])


async def test_three_streams_interleave_and_cancel_stops_one_within_a_token_interval(proxy_factory):
    p = proxy_factory(server_args=PACE)
    frames: dict[str, list[dict]] = {sid: [] for sid in PROMPTS}
    cancel_sent = 0.0
    async with open_ws(p.ws_url) as ws:
        for sid, prompt in PROMPTS.items():
            await send(ws, start_frame(sid, prompt, seed=3))
        open_ids = set(PROMPTS)
        deadline = time.monotonic() + 60
        while open_ids:
            frame = await recv(ws, deadline - time.monotonic())
            frame["_t"] = time.monotonic()
            frames[frame["id"]].append(frame)
            if frame["type"] in ("done", "error"):
                open_ids.discard(frame["id"])
            tokens_p = sum(f["type"] == "token" for f in frames["p"])
            if tokens_p == 10 and not cancel_sent:
                cancel_sent = time.monotonic()
                await send(ws, {"type": "cancel", "id": "p"})

    # Interleaved: the three streams alternated rather than ran one after another.
    before_cancel = sorted((f["_t"], sid) for sid, fs in frames.items() for f in fs if f["type"] == "token" and f["_t"] < cancel_sent)
    order = [sid for _, sid in before_cancel]
    assert sum(1 for a, b in zip(order, order[1:]) if a != b) >= 15, order

    done_p = frames["p"][-1]
    assert done_p["type"] == "done" and done_p["finish_reason"] == "cancelled"
    assert done_p["_t"] - cancel_sent < 0.050, "cancel must land within one token interval (50 ms)"
    assert sum(f["type"] == "token" for f in frames["p"]) <= 11  # at most one already in flight

    for sid in ("q", "b"):
        assert frames[sid][-1]["type"] == "done" and frames[sid][-1]["finish_reason"] == "stop"
        seqs = [f["seq"] for f in frames[sid]]
        assert seqs == list(range(1, len(seqs) + 1)) or all(b > a for a, b in zip(seqs, seqs[1:]))
        # The same seeded request run alone gives the same text: nothing lost or repeated.
        assert text_of(frames[sid]) == await run_alone(p.ws_url, sid, PROMPTS[sid])
