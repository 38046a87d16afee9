"""The router's thin driver over scripted backends: no sockets, a fake clock and sleep."""

from __future__ import annotations

import logging
import random
from contextlib import aclosing

import pytest

from server.core.events import Attempt, Finished, FinishReason, Routed, TextDelta, UsageReport
from server.core.request import ChatMessage, ChatRequest
from server.errors import Overloaded, RateLimited, StreamCut, UpstreamServerError
from server.providers.base import DeploymentInfo
from server.routing import AfterFirstToken, ModelRoute, RetryPolicy, Router, RoutingCatalog
from server.routing.attempts import AttemptFailed, FailingOver, UsageParts
from server.routing.policy import BreakerPolicy, BudgetPolicy


class Scripted:
    """A backend that plays one script per call: a list of events, ending in an exception or not."""

    def __init__(self, name: str, *scripts: list) -> None:
        self.info = DeploymentInfo(name, "openai", f"up-{name}")
        self.scripts = list(scripts)
        self.calls: list[ChatRequest] = []
        self.closed = 0

    async def stream(self, request):
        self.calls.append(request)
        script = self.scripts.pop(0)
        try:
            for item in script:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed += 1

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def router(models, routes, clock: Clock) -> Router:
    catalog = RoutingCatalog(models, routes, BudgetPolicy(min_concurrent=50))
    return Router(catalog, clock=clock, rng=random.Random(1), sleep=clock.sleep)


def ask(model: str) -> ChatRequest:
    return ChatRequest(model, (ChatMessage("user", "hi"),))


async def collect(r: Router, model: str):
    events, error = [], None
    try:
        async with aclosing(r.stream(ask(model))) as stream:
            async for e in stream:
                events.append(e)
    except Exception as exc:  # the driver raises the stream's error
        error = exc
    return events, error


async def test_a_500_then_a_success_yields_two_attempts_and_one_routed():
    clock = Clock()
    a = Scripted("a", [UpstreamServerError("boom", status=500)], [TextDelta("hi"), Finished(FinishReason.STOP)])
    r = router({"m": [a]}, {"m": ModelRoute(retry=RetryPolicy(backoff_base_s=0.1))}, clock)
    events, error = await collect(r, "m")
    assert error is None
    assert events == [Attempt("openai", "up-a", "a"), Attempt("openai", "up-a", "a"), Routed("openai", "up-a", "a"),
                      TextDelta("hi"), Finished(FinishReason.STOP)]
    assert len(clock.slept) <= 1 and all(s <= 0.1 for s in clock.slept)


async def test_a_continuation_through_the_driver_sums_usage_and_tells_the_operator(caplog):
    clock = Clock()
    a = Scripted("a", [TextDelta("one"), TextDelta(" two"), StreamCut("cut")])
    b = Scripted("b", [TextDelta(" two"), TextDelta(" three"), UsageReport(9, 2), Finished(FinishReason.STOP)])
    routes = {"m": ModelRoute(after_first_token=AfterFirstToken.CONTINUE, fallbacks=("fb",)), "fb": ModelRoute()}
    r = router({"m": [a], "fb": [b]}, routes, clock)
    notes = []
    r.observers.append(notes.append)
    with caplog.at_level(logging.INFO, logger="llmproxy.routing"):
        events, error = await collect(r, "m")
    assert error is None and clock.slept == []
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "one two three"
    assert [e for e in events if isinstance(e, UsageReport)][-1] == UsageReport(9, 4, 0)
    assert b.calls[0].messages[-2] == ChatMessage("assistant", "one two")
    assert [type(n) for n in notes] == [AttemptFailed, FailingOver, UsageParts]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "llmproxy.routing"]
    assert len(lines) == 3 and lines[1].startswith("event=continuation model=m from=a deployment=b")


async def test_closing_the_stream_mid_answer_closes_the_upstream_and_releases_everything():
    clock = Clock()
    a = Scripted("a", [TextDelta("one"), TextDelta(" two"), Finished(FinishReason.STOP)])
    r = router({"m": [a]}, {}, clock)
    async with aclosing(r.stream(ask("m"))) as stream:
        async for e in stream:
            if isinstance(e, TextDelta):
                break
    assert a.closed == 1 and r.budget.active == 0
    assert r.deployment_states("m")[0].inflight == 0 and r.breaker_states() == {"a": "closed"}


async def test_every_breaker_open_is_overloaded_with_a_retry_after():
    clock = Clock()
    a = Scripted("a", [RateLimited("slow", status=429, retry_after_s=30)])
    route = ModelRoute(retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(failures=1, cooldown_s=5))
    r = router({"m": [a]}, {"m": route}, clock)
    _, error = await collect(r, "m")
    assert isinstance(error, RateLimited)
    _, error = await collect(r, "m")
    assert isinstance(error, Overloaded) and error.retry_after_s == pytest.approx(30)
    assert r.breaker_states() == {"a": "open"}
