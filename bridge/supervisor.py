"""Background jobs that cannot die silently, and the event loop a process runs on.

A process's periodic jobs (the server's session expiry, heartbeats and analytics; the bridge's
relay and watchdog) each run in a task of their own under a `Supervisor`. A job that raises is
logged with its traceback and restarted after a short backoff; one that fails `max_failures`
times within `window_s` (or returns, which a job never should) marks the supervisor failed, and
the process shuts down and exits non-zero instead of running on without it. Used by the server
too (it is one distribution; nothing here knows about either side).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine


class Supervisor:
    def __init__(self, log: logging.Logger, max_failures: int = 5, window_s: float = 60.0, backoff_s: float = 0.5) -> None:
        self._log = log
        self._max_failures = max_failures
        self._window_s = window_s
        self._backoff_s = backoff_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.failed = asyncio.Event()
        self.failure = ""  # which job failed for good, and how

    def start(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        self._tasks[name] = asyncio.create_task(self._guard(name, job), name=name)

    async def _guard(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        failures: list[float] = []
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.error("background job %r failed; restarting it", name, exc_info=True)
                reason = f"{type(exc).__name__}: {exc}"
            else:
                self._log.error("background job %r returned; it must run until stopped", name)
                reason = "returned"
            now = time.monotonic()
            failures = [t for t in failures if now - t < self._window_s] + [now]
            if len(failures) >= self._max_failures:
                self.failure = f"{name}: {reason} ({len(failures)} failures in {self._window_s:.0f}s)"
                self._log.critical("background job %r keeps failing; shutting down (%s)", name, self.failure)
                self.failed.set()
                return
            await asyncio.sleep(self._backoff_s * len(failures))

    async def wait_failed_or(self, stop: asyncio.Event) -> bool:
        """Waits until `stop` is set or a job failed for good; returns whether one failed."""
        waiters = {asyncio.create_task(stop.wait()), asyncio.create_task(self.failed.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self.failed.is_set()

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def run_loop(coro_factory: Callable[[], Coroutine[object, object, None]]) -> None:
    """Runs a process's main coroutine under uvloop when it is installed (measured faster in
    make bench), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(coro_factory())
    else:
        uvloop.run(coro_factory())
