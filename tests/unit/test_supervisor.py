"""Background jobs cannot die silently: a failure is logged and restarted; a job that keeps
failing stops the process (which then exits non-zero)."""

from __future__ import annotations

import asyncio
import logging

from bridge.supervisor import Supervisor


async def test_a_failing_job_is_logged_and_restarted(caplog):
    runs = []

    async def job() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.Event().wait()

    jobs = Supervisor(logging.getLogger("t"), backoff_s=0.001)
    with caplog.at_level(logging.ERROR):
        jobs.start("j", job)
        while len(runs) < 3:
            await asyncio.sleep(0.001)
    assert not jobs.failed.is_set()
    assert sum("background job 'j' failed" in r.message for r in caplog.records) == 2
    assert caplog.records[0].exc_info is not None
    await jobs.stop()


async def test_a_job_that_keeps_failing_fails_the_process():
    async def job() -> None:
        raise ValueError("always")

    jobs = Supervisor(logging.getLogger("t"), max_failures=3, backoff_s=0.001)
    jobs.start("j", job)
    assert await asyncio.wait_for(jobs.wait_failed_or(asyncio.Event()), 5)
    assert "j: ValueError: always" in jobs.failure
    await jobs.stop()


async def test_a_job_that_returns_is_a_failure_too():
    async def job() -> None:
        return

    jobs = Supervisor(logging.getLogger("t"), max_failures=2, backoff_s=0.001)
    jobs.start("j", job)
    assert await asyncio.wait_for(jobs.wait_failed_or(asyncio.Event()), 5)
    await jobs.stop()
