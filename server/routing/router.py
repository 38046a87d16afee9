"""The router: the thin async driver of the routing policy.

Theory of operation. `Router.stream(request)` tries deployments until one answers. The groups
are the request's model, then its configured fallbacks in order; each group gets up to
`retry.max_attempts` attempts. Within a group the strategy picks among the deployments whose
breaker lets an attempt through, preferring those not yet tried by this request and not cooling
down after a `retry-after`; retrying a deployment already tried waits for the backoff (full
jitter, never less than its retry-after). Every attempt after the first needs a slot of the
shared retry budget, and none starts after the request's deadline: then the last error goes to
the client.

What the client sees. `Routed` is yielded when an attempt produces its first event, so the
started frame names a deployment that answered, and a failover before the first token yields
`Routed` again (the core allows it before content; `done` names the last one). A non-retryable
error (caller-type 4xx, context length, content filter, upstream auth) is raised after that one
attempt. After the first token a retryable failure is raised (the core reports the partial
usage), unless the model says `after_first_token: continue` and the answer so far is plain
text: then the next attempt gets the partial answer as an assistant message plus a request to
continue, its repeated start is stripped, its usage is added to the earlier attempts', and the
client keeps reading one stream; the continuing attempt's `Routed` becomes a `failover` frame.

Cancelling the consumer (or closing this generator) closes the upstream request at once; the
attempt then counts neither as a success nor as a failure for the breaker.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from server.catalog import Catalog
from server.core.events import (
    Finished,
    ReasoningDelta,
    Routed,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from server.core.request import ChatRequest
from server.errors import Overloaded, ProxyError, StreamCut, UpstreamError, UpstreamUnauthenticated
from server.providers.base import Backend
from server.routing.breaker import Breaker, BreakerState
from server.routing.policy import (
    AfterFirstToken,
    BreakerPolicy,
    BudgetPolicy,
    Candidate,
    ModelRoute,
    OverlapStripper,
    RetryBudget,
    RoutingCatalog,
    choose,
    continuation_request,
    ewma,
    retry_delay_s,
)


@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    """What ListModels, health and metrics may show of a deployment's routing state."""

    name: str
    provider: str
    upstream_model: str
    weight: float
    breaker: str  # "closed" | "open" | "half_open"
    inflight: int
    ttft_ms: float  # EWMA of time to first token; 0 before the first sample


class _Deployment:
    """The live routing state of one backend."""

    __slots__ = ("backend", "breaker", "inflight", "ttft_s", "not_before")

    def __init__(self, backend: Backend, policy: BreakerPolicy) -> None:
        self.backend = backend
        self.breaker = Breaker(policy)
        self.inflight = 0
        self.ttft_s: float | None = None
        self.not_before = 0.0  # cooling down after a retry-after until this time

    def candidate(self) -> Candidate:
        return Candidate(self.backend.info.weight, self.inflight, self.ttft_s)


def _breaker_outcome(exc: ProxyError) -> bool | None:
    """True: the upstream answered properly (even if it refused the request); False: the
    deployment failed; None: no upstream outcome (the request could not be built)."""
    if not isinstance(exc, UpstreamError):
        return None
    if isinstance(exc, UpstreamUnauthenticated):
        return False  # our key is refused: every request to it will fail
    return not exc.retryable


_CONTENT = (TextDelta, ReasoningDelta, ToolCallDelta)


class Router:
    def __init__(
        self,
        catalog: Catalog,
        *,
        budget: BudgetPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._catalog = catalog
        if budget is None:
            budget = catalog.budget if isinstance(catalog, RoutingCatalog) else BudgetPolicy()
        self.budget = RetryBudget(budget)
        self._clock = clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._deployments: dict[int, _Deployment] = {}

    # -- state -----------------------------------------------------------------------------------

    def route(self, model: str) -> ModelRoute:
        if isinstance(self._catalog, RoutingCatalog):
            return self._catalog.route(model)
        return ModelRoute()

    def _deployment(self, backend: Backend, policy: BreakerPolicy) -> _Deployment:
        dep = self._deployments.get(id(backend))
        if dep is None:
            dep = self._deployments[id(backend)] = _Deployment(backend, policy)
        return dep

    def breaker_state(self, deployment: str) -> str:
        """The breaker state of a deployment by name ("" when no model routes to it)."""
        for model in self._catalog.names():
            for status in self.deployment_states(model):
                if status.name == deployment:
                    return status.breaker
        return ""

    def deployment_states(self, model: str) -> list[DeploymentStatus]:
        """The routing state of each deployment of `model`; raises `UnknownModel`."""
        policy = self.route(model).breaker
        now = self._clock()
        out = []
        for backend in self._catalog.backends(model):
            dep = self._deployment(backend, policy)
            info = backend.info
            state: BreakerState = dep.breaker.current(now)
            ttft_ms = (dep.ttft_s or 0.0) * 1000
            out.append(DeploymentStatus(info.name, info.provider, info.upstream_model, info.weight, state.value, dep.inflight, ttft_ms))
        return out

    def _pick(
        self, groups: list[str], start: int, attempts: list[int], tried: set[int], deadline: float, retry_number: int
    ) -> tuple[int, _Deployment, float] | None:
        """The next attempt: (group index, deployment, wait before it), or None."""
        now = self._clock()
        for g in range(start, len(groups)):
            route = self.route(groups[g])
            if attempts[g] >= route.retry.max_attempts:
                continue
            deps = [self._deployment(b, route.breaker) for b in self._catalog.backends(groups[g])]
            deps = [d for d in deps if d.breaker.available(now)]
            if not deps:
                continue
            fresh = [d for d in deps if id(d.backend) not in tried and d.not_before <= now]
            if fresh:
                return g, fresh[choose(route.strategy, [d.candidate() for d in fresh], self._rng)], 0.0
            ready = [d for d in deps if d.not_before <= now]
            if ready:
                dep = ready[choose(route.strategy, [d.candidate() for d in ready], self._rng)]
            else:
                dep = min(deps, key=lambda d: d.not_before)
            delay = max(dep.not_before - now, 0.0)
            if id(dep.backend) in tried:
                delay = max(delay, retry_delay_s(retry_number, route.retry, self._rng))
            if now + delay <= deadline:
                return g, dep, delay
        return None

    # -- the stream ------------------------------------------------------------------------------

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        """Yields `Routed` and then the provider events of one answer (see the module doc).

        Raises `UnknownModel`, the last attempt's `ProxyError`, and `Overloaded` when every
        deployment's breaker is open. Cancelling the consumer closes the upstream request.
        """
        model = request.model
        self._catalog.backends(model)  # raises UnknownModel
        route = self.route(model)
        groups = [model, *(m for m in route.fallbacks if m in self._catalog and m != model)]
        clock, budget = self._clock, self.budget
        deadline = clock() + route.retry.deadline_s
        attempts = [0] * len(groups)
        tried: set[int] = set()
        group = 0
        total = 0
        last_error: ProxyError | None = None
        partial: list[str] = []  # the answer text the client has
        streaming = False  # content reached the client
        text_only = True
        continued = False
        base = [0, 0, 0]  # usage of earlier attempts whose content the client has
        budget.start_request(clock())
        try:
            while True:
                pick = self._pick(groups, group, attempts, tried, deadline, total)
                if pick is None:
                    if last_error is None:
                        raise Overloaded(f"no deployment of {model!r} is available (circuit open)")
                    raise last_error
                group, dep, delay = pick
                holding = False
                if total:
                    if not budget.try_acquire(clock()):
                        assert last_error is not None
                        raise last_error
                    holding = True
                try:
                    if delay > 0:
                        await self._sleep(delay)
                    permit = dep.breaker.allow(clock())
                    if permit is None:
                        continue  # it opened while we waited: pick again
                    attempts[group] += 1
                    total += 1
                    tried.add(id(dep.backend))
                    backend, info = dep.backend, dep.backend.info
                    continuing = streaming
                    stripper: OverlapStripper | None = None
                    upstream_request = request
                    if continuing:
                        text = "".join(partial)
                        upstream_request = continuation_request(request, text)
                        stripper = OverlapStripper(text)
                    routed = False
                    got_first = False
                    usage = [0, 0, 0]
                    outcome: bool | None = None
                    started = clock()
                    dep.inflight += 1
                    try:
                        async with aclosing(backend.stream(upstream_request)) as events:
                            async for event in events:
                                if not routed:
                                    routed = True
                                    yield Routed(info.provider, info.upstream_model, info.name)
                                cls = type(event)
                                if cls is TextDelta or cls is ReasoningDelta or cls is ToolCallDelta:
                                    if not got_first:
                                        got_first = True
                                        dep.ttft_s = ewma(dep.ttft_s, clock() - started)
                                        if holding:
                                            holding = False
                                            budget.release()
                                    if cls is TextDelta:
                                        assert isinstance(event, TextDelta)
                                        if stripper is not None:
                                            kept = stripper.feed(event.text)
                                            if not kept:
                                                continue
                                            if kept is not event.text:
                                                event = TextDelta(kept)
                                        partial.append(event.text)
                                    else:
                                        text_only = False
                                    streaming = True
                                elif cls is UsageReport:
                                    assert isinstance(event, UsageReport)
                                    usage = [event.prompt_tokens, event.completion_tokens, event.reasoning_tokens]
                                    if continuing:
                                        event = UsageReport(*(b + u if u else 0 for b, u in zip(base, usage, strict=True)))
                                elif cls is Finished:
                                    if stripper is not None and (rest := stripper.flush()):
                                        partial.append(rest)
                                        yield TextDelta(rest)
                                    outcome = True
                                    yield event
                                    return
                                yield event
                        raise StreamCut(f"the stream of {info.provider} ended without its finish event")
                    except ProxyError as exc:
                        now = clock()
                        outcome = _breaker_outcome(exc)
                        if exc.retry_after_s:
                            dep.not_before = max(dep.not_before, now + exc.retry_after_s)
                        if not exc.retryable:
                            raise
                        if streaming:
                            if route.after_first_token is AfterFirstToken.ERROR or not text_only:
                                raise
                            if not continued:  # a continuation gets its own deadline
                                continued = True
                                deadline = now + route.retry.deadline_s
                            if got_first:
                                base = [b + u for b, u in zip(base, usage, strict=True)]
                        last_error = exc
                    finally:
                        dep.inflight -= 1
                        if outcome is None:
                            dep.breaker.release(permit)
                        else:
                            dep.breaker.record(permit, outcome, clock())
                finally:
                    if holding:
                        budget.release()
        finally:
            budget.end_request()
