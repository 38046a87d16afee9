"""A small WebSocket test client: send JSON frames, collect frames per stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect


@asynccontextmanager
async def open_ws(url: str, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    """Connects and reads the `session` frame every connection starts with (kept as
    `ws.session`)."""
    async with connect(url, **kwargs) as ws:
        first = await recv(ws)
        assert first["type"] == "session" and first["token"] == "" and first["resume_token"], first
        ws.session = first  # type: ignore[attr-defined]
        yield ws


def start_frame(sid: str | None, prompt: str = "Explain quantum computing", model: str = "demo", **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "start", "model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    if sid is not None:
        frame["id"] = sid
    return frame


async def send(ws: ClientConnection, frame: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(frame).decode())


async def recv(ws: ClientConnection, timeout_s: float = 10.0) -> dict[str, Any]:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout_s))  # type: ignore[no-any-return]


async def collect(ws: ClientConnection, stream_ids: set[str], timeout_s: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    """Reads until every stream in `stream_ids` has ended; frames get a `_t` receive time."""
    frames: dict[str, list[dict[str, Any]]] = {sid: [] for sid in stream_ids}
    open_ids = set(stream_ids)
    deadline = time.monotonic() + timeout_s
    while open_ids:
        frame = await recv(ws, deadline - time.monotonic())
        frame["_t"] = time.monotonic()
        frames.setdefault(frame.get("id", ""), []).append(frame)
        if frame["type"] in ("done", "error") and frame.get("seq", 0) > 0:
            open_ids.discard(frame["id"])
        elif frame["type"] == "error" and frame["id"] in open_ids and not any(f["type"] == "started" for f in frames[frame["id"]]):
            open_ids.discard(frame["id"])  # rejected before it started
    return frames


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["token"] for f in frames)
