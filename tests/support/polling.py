"""Polling until something holds, for tests that wait on another process's state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest


async def eventually(
    get: Callable[[], object], ok: Callable[[object], bool], what: str, timeout_s: float = 10.0, every_s: float = 0.05
) -> object:
    """Polls `get()` (a function or a coroutine function) until `ok(value)`; fails after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = get()
        if asyncio.iscoroutine(value):
            value = await value
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout_s} s; last: {value!r}"[:3000])
        await asyncio.sleep(every_s)
