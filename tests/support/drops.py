"""Helpers of the tests that drop connections and resume: the three demo prompts, the texts a
stream gives uninterrupted, readers that count tokens as they come."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from llmproxy_client import Backoff, WSClient

PROMPTS = ["Explain quantum computing", "How does photosynthesis work?", "What is a black hole?"]
FAST_BACKOFF = Backoff(base_s=0.05, factor=1.6, jitter=0.2, cap_s=0.5)


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def expected_texts(url: str, max_tokens: int, model: str = "demo", seed: int = 11) -> list[str]:
    """Each prompt's text over one connection that is never dropped."""
    async with WSClient(url, reconnect=False) as client:
        handles = [client.stream(model=model, messages=messages(p), seed=seed, max_tokens=max_tokens) for p in PROMPTS]
        return ["".join([t async for t in h]) for h in handles]


async def until(condition: Callable[[], bool]) -> None:
    """Polls `condition()` until it holds (the caller bounds it with asyncio.wait_for)."""
    while not condition():
        await asyncio.sleep(0.005)


async def wait_tokens(counts: dict[str, int], at_least: int) -> None:
    await until(lambda: min(counts.values()) >= at_least)


async def consume(handle: Any, counts: dict[str, int], out: dict[str, str]) -> None:
    """Reads a stream's tokens, counting them as they come; its text goes to `out`."""
    parts = []
    async for t in handle:
        parts.append(t)
        counts[handle.id] = counts.get(handle.id, 0) + 1
    out[handle.id] = "".join(parts)
