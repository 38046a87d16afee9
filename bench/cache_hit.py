"""First-token time of a live answer, an exact cache hit and a semantic cache hit, and the cost
of a cache lookup; `make bench` runs it last and keeps its output in bench/results/cache.txt:

    python -m bench.cache_hit [--rounds 20] [--ttft 0.4] [--pace 0.02]

Starts the fake OpenAI upstream (time to first token --ttft, then a token every --pace seconds)
and a server + bridge whose config caches the model exactly and semantically (the local
embedding model), then over WebSocket: each round asks a new question (live, stored), the same
question again (exact hit) and a paraphrase that hits at the default threshold (semantic hit).
The first-token time is measured by the client, from sending the start frame to the first token
frame. Then, in process, the lookup cost with a store of --entries entries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import orjson
from websockets.asyncio.client import connect

from tests.support.procs import start, start_proxy

# question -> a paraphrase that hits at the default threshold with the local model
PARAPHRASES = [
    ("How do I reverse a list in Python?", "How can I reverse a list in Python?"),
    ("How do I delete a git branch?", "How can I delete a git branch?"),
    ("What is the tallest building in the world?", "What's the world's tallest building?"),
    ("How many calories are in a banana?", "How many calories does a banana have?"),
    ("Is a tomato a fruit?", "Is the tomato a fruit?"),
]


async def first_token_ms(url: str, prompt: str) -> tuple[float, str]:
    async with connect(url) as ws:
        await ws.recv()  # session
        t0 = time.perf_counter()
        await ws.send(orjson.dumps({"type": "start", "id": "s", "model": "m", "messages": [{"role": "user", "content": prompt}]}).decode())
        kind = ""
        first = 0.0
        while True:
            frame = orjson.loads(await ws.recv())
            if frame["type"] == "started":
                kind = frame.get("cache", {}).get("kind", "live")
            elif frame["type"] == "token" and not first:
                first = (time.perf_counter() - t0) * 1000
            elif frame["type"] in ("done", "error"):
                return first, kind


def lookup_costs(entries: int) -> dict[str, float]:
    from server.cache.embeddings import LocalEmbedder
    from server.cache.key import exact_key, semantic_scope
    from server.cache.store import SqliteStore, StoredEntry
    from server.core.request import ChatMessage, ChatRequest

    embedder = LocalEmbedder()
    store = SqliteStore(max_entries=entries + 10)
    now = time.time()
    request = ChatRequest("m", (ChatMessage("system", "You are helpful."), ChatMessage("user", "How do I reverse a list in Python?")))
    scope = semantic_scope(request, ["up"], "")
    for i in range(entries):  # worst case: every entry in the same scope
        vector = embedder.embed_now(f"question number {i} about topic {i % 97}")
        store.put(StoredEntry(f"k{i}", "", "m", scope, b"x" * 2000, vector, now + 3600), now)
    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        store.get(exact_key(request, ["up"], f"t{i}"), now)
    exact_us = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n):
        store.nearest(scope, embedder.embed_now(f"How can I reverse a list in Python {i}?"), now)
    semantic_us = (time.perf_counter() - t0) / n * 1e6
    return {"exact_us": exact_us, "semantic_us": semantic_us}


async def chain_rounds(rounds: int, ttft: float, pace: float) -> dict[str, list[float]]:
    fake = start("fake-openai", ["tests.fakes.openai", "--port", "0"], "fake-openai listening on ")
    try:
        config = {
            "models": {"m": {"provider": "openai", "model": f"m@tokens=20,ttft={ttft},pace={pace}", "base_url": f"http://{fake.address}/v1", "key": "env:BENCH_KEY"}},
            "cache": {"default": {"semantic": True}},
        }
        path = Path(tempfile.mkdtemp()) / "llmproxy.yaml"
        path.write_text(json.dumps(config))
        proxy = start_proxy(("--config", str(path)), (), {"BENCH_KEY": "sk-bench"})
        try:
            out: dict[str, list[float]] = {"live": [], "exact": [], "semantic": []}
            for r in range(rounds):
                question, paraphrase = PARAPHRASES[r % len(PARAPHRASES)]
                suffix = f" (round {r})" if r >= len(PARAPHRASES) else ""
                for prompt, want in ((question + suffix, "live"), (question + suffix, "exact"), (paraphrase + suffix, "semantic")):
                    ms, kind = await first_token_ms(proxy.ws_url, prompt)
                    if kind != want:
                        raise SystemExit(f"round {r}: expected {want}, got {kind} for {prompt!r}")
                    out[kind].append(ms)
            return out
        finally:
            proxy.stop()
    finally:
        fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ttft", type=float, default=0.4)
    parser.add_argument("--pace", type=float, default=0.02)
    parser.add_argument("--entries", type=int, default=10_000)
    args = parser.parse_args()
    results = asyncio.run(chain_rounds(args.rounds, args.ttft, args.pace))
    print(f"first-token time over WebSocket, upstream ttft {args.ttft * 1000:.0f} ms, {args.rounds} rounds")
    print(f"{'answer':<10} {'p50 ms':>8} {'p90 ms':>8} {'min ms':>8}")
    for kind, values in results.items():
        values.sort()
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"{kind:<10} {statistics.median(values):>8.2f} {p90:>8.2f} {values[0]:>8.2f}")
    costs = lookup_costs(args.entries)
    print(f"\nlookup cost per request, {args.entries} entries in the store (all in one semantic scope):")
    print(f"  exact    (key hash + SQLite get):                        {costs['exact_us']:.1f} us")
    print(f"  semantic (local embedding + one matrix-vector product):  {costs['semantic_us']:.1f} us")


if __name__ == "__main__":
    main()
