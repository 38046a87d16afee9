import orjson
from websockets.asyncio.client import connect


async def test_bare_request_streams_token_and_latency_on_every_frame(proxy):
    async with connect(proxy.ws_url) as ws:
        await ws.send(orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "Explain quantum computing"}], "stream": True}).decode())
        frames = []
        async for raw in ws:
            frames.append(orjson.loads(raw))
            if frames[-1]["type"] in ("done", "error"):
                break
    assert all(isinstance(f["token"], str) and f["latency"].endswith("ms") for f in frames)
    assert [f["type"] for f in frames[:2]] == ["session", "started"] and frames[-1]["type"] == "done"
    text = "".join(f["token"] for f in frames)
    assert text.startswith("Quantum computing uses the rules of quantum mechanics")
    assert frames[-1]["finish_reason"] == "stop"
