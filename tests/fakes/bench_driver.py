"""CPU per token of the streaming driver (HttpBackend + SSE decoder + adapter), per transport.

    python -m tests.fakes.bench_driver [--tokens 500] [--streams 20] [--pace 0.001]

The fake OpenAI upstream runs in a subprocess so its CPU is not counted; this process runs the
driver under uvloop (as the server does) and reports `time.process_time()` per token:

- paced: each token in its own TCP read (`pace` seconds apart), as a real provider streams;
- burst: the fake writes as fast as it can, so reads carry many events each;
- request: streams of one token each, so the figure is the CPU of opening and closing one
  request (building it, the connection from the pool, the response head);
- decode only: the SSE decoder and the adapter's decoder over the same bytes, no I/O.

Prints one JSON object per line (for `make bench`) and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from contextlib import aclosing

from server.core.request import ChatMessage, ChatRequest
from server.providers.adapter import Endpoint, Secret
from server.providers.base import DeploymentInfo
from server.providers.http import ClientPool, HttpBackend, HttpSettings
from server.providers.openai import OpenAIAdapter
from server.providers.sse import SSEDecoder
from tests.fakes.openai import OpenAIFake

REQUEST = ChatRequest("bench", (ChatMessage("user", "go"),))


async def run_streams(base_url: str, transport: str, tokens: int, streams: int, knobs: str) -> float:
    pool = ClientPool(HttpSettings(transport=transport))  # type: ignore[arg-type]
    adapter = OpenAIAdapter("openai", base_url, "max_completion_tokens")
    endpoint = Endpoint("openai", f"m@tokens={tokens}{knobs}", base_url, Secret("sk-bench"))
    backend = HttpBackend(DeploymentInfo("bench", "openai", "m"), adapter, endpoint, pool)

    async def one() -> int:
        n = 0
        async with aclosing(backend.stream(REQUEST)) as events:
            async for _ in events:
                n += 1
        return n

    try:
        await asyncio.gather(*(one() for _ in range(min(streams, 4))))  # warm the pool
        cpu0 = time.process_time()
        await asyncio.gather(*(one() for _ in range(streams)))
        return (time.process_time() - cpu0) / (tokens * streams) * 1e6
    finally:
        await pool.aclose()


def decode_only(tokens: int) -> float:
    script = OpenAIFake().script(__import__("tests.fakes.base", fromlist=["Knobs"]).Knobs(tokens=tokens))
    chunks = script.pre + script.tokens + script.post + script.done
    adapter = OpenAIAdapter("openai", "", "max_completion_tokens")
    rounds = 20
    cpu0 = time.process_time()
    for _ in range(rounds):
        sse, decoder = SSEDecoder(), adapter.new_decoder()
        for chunk in chunks:
            for event in sse.decode(chunk):
                decoder.feed(event)
    return (time.process_time() - cpu0) / (tokens * rounds) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--pace", type=float, default=0.001)
    args = parser.parse_args()
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        port = fake.stdout.readline().rsplit(":", 1)[1].strip()
        base_url = f"http://127.0.0.1:{port}/v1"
        import uvloop

        results = []
        for mode, tokens, streams, knobs in (
            ("paced", args.tokens, args.streams, f",pace={args.pace}"),
            ("burst", args.tokens, args.streams, ""),
            ("request", 1, 200, ""),
        ):
            for transport in ("httpx", "aiohttp", "native"):
                us = uvloop.run(run_streams(base_url, transport, tokens, streams, knobs))
                results.append({"bench": "driver_cpu_per_token", "mode": mode, "transport": transport, "us_per_token": round(us, 2)})
        results.append({"bench": "driver_cpu_per_token", "mode": "decode_only", "transport": "-", "us_per_token": round(decode_only(args.tokens), 2)})
        for r in results:
            print(json.dumps(r))
        print(f"\n{'mode':<12}{'transport':<10}{'CPU us/token':>14}")
        for r in results:
            print(f"{r['mode']:<12}{r['transport']:<10}{r['us_per_token']:>14}")
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
