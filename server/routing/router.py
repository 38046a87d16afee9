"""The router: the thin async driver of the attempt state machine (`attempts.Attempts`).

Theory of operation. `Router.stream(request)` builds an `Attempts` for the request (the model's
group, then its configured fallbacks) and runs it: it sleeps each plan's wait, opens the
upstream call, feeds every provider event and the call's end to the machine, and yields the
events the machine returns for the client. Which deployment comes next, retries, backoff,
retry-after, the retry budget, the circuit breakers, continuation after the first token and the
usage of every attempt are all decided in `attempts.py` (see its docstring); this module owns the
shared per-deployment state, the clock, the sleep, and the operator's log lines and observers.

What the client sees. An `Attempt` event per upstream attempt (the core counts them and names
the deployment in an error), `Routed` when an attempt produces its first event (the started
frame, or a failover frame when it continues an answer), then the provider events; usage is the
sum over every attempt, and an `AttemptEnded` carries one attempt's own usage when the stream has
(or may get) more than one part. Cancelling the consumer (or closing this generator) closes the upstream
request at once; the attempt then counts neither as a success nor as a failure for the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from server.catalog import Catalog
from server.core.events import StreamEvent
from server.core.request import ChatRequest
from server.errors import ProxyError
from server.providers.base import Backend
from server.routing.attempts import (
    AttemptFailed,
    Attempts,
    BreakerMoved,
    DeploymentState,
    FailingOver,
    GiveUp,
    Note,
    Phase,
    Retrying,
    UsageParts,
)
from server.routing.breaker import BreakerState
from server.routing.policy import BreakerPolicy, BudgetPolicy, ModelRoute, RetryBudget, RoutingCatalog

log = logging.getLogger("llmproxy.routing")


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


def describe(note: Note) -> str:
    """One logfmt line for an operator note (keys and prompt text never appear in a note)."""
    if isinstance(note, AttemptFailed):
        return (
            f"event=attempt_failed model={note.model} deployment={note.deployment} attempt={note.attempt} "
            f"code={note.code} status={note.status} after_content={str(note.after_content).lower()} "
            f"elapsed_ms={note.elapsed_ms} message={note.message!r}"
        )
    if isinstance(note, Retrying):
        return f"event=retry model={note.model} deployment={note.deployment} attempt={note.attempt} wait_ms={note.wait_ms}"
    if isinstance(note, FailingOver):
        kind = "continuation" if note.continuation else "failover"
        return (
            f"event={kind} model={note.model} from={note.from_deployment} deployment={note.deployment} "
            f"attempt={note.attempt} wait_ms={note.wait_ms}"
        )
    if isinstance(note, BreakerMoved):
        return f"event=breaker_{note.state} deployment={note.deployment}"
    parts = " ".join(
        f"{name}:{u.prompt_tokens}+{u.completion_tokens}" for name, u in note.parts
    )
    return f"event=usage_parts model={note.model} parts={parts}"


class Router:
    """Owns the per-deployment routing state and drives one `Attempts` per request.

    `observers` get every operator note (failed attempt, retry, failover, continuation, breaker
    opening and closing, usage parts); each note is also logged once on `llmproxy.routing`."""

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
        self._deployments: dict[int, DeploymentState] = {}
        self.observers: list[Callable[[Note], None]] = []

    # -- state -----------------------------------------------------------------------------------

    def route(self, model: str) -> ModelRoute:
        if isinstance(self._catalog, RoutingCatalog):
            return self._catalog.route(model)
        return ModelRoute()

    def _deployment(self, backend: Backend, policy: BreakerPolicy) -> DeploymentState:
        dep = self._deployments.get(id(backend))
        if dep is None:
            dep = self._deployments[id(backend)] = DeploymentState(backend, policy)
        return dep

    def _deployments_of(self, model: str, policy: BreakerPolicy) -> list[DeploymentState]:
        return [self._deployment(b, policy) for b in self._catalog.backends(model)]

    def breaker_state(self, deployment: str) -> str:
        """The breaker state of a deployment by name ("" when no model routes to it)."""
        for model in self._catalog.names():
            for status in self.deployment_states(model):
                if status.name == deployment:
                    return status.breaker
        return ""

    def provider_of(self, deployment: str) -> str:
        """The provider of a configured deployment by name ("" when no model routes to it)."""
        for model in self._catalog.names():
            for backend in self._catalog.backends(model):
                if backend.info.name == deployment:
                    return backend.info.provider
        return ""

    def breaker_states(self) -> dict[str, str]:
        """The breaker state of every configured deployment, by name (for /metrics). It changes
        nothing, so the metrics server may call it from its own thread."""
        now = self._clock()
        known = dict(self._deployments)  # one C-level copy: the loop thread may add entries
        out: dict[str, str] = {}
        for model in self._catalog.names():
            for backend in self._catalog.backends(model):
                dep = known.get(id(backend))
                out.setdefault(backend.info.name, dep.breaker.peek(now).value if dep is not None else "closed")
        return out

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

    def _emit_notes(self, attempts: Attempts) -> None:
        for note in attempts.notes_to_emit():
            if isinstance(note, (AttemptFailed, BreakerMoved)):
                log.warning("%s", describe(note))
            else:
                log.info("%s", describe(note))
            for observer in self.observers:
                observer(note)

    # -- the stream ------------------------------------------------------------------------------

    async def stream(self, request: ChatRequest, partial: str = "") -> AsyncGenerator[StreamEvent, None]:
        """Yields `Attempt`, `Routed` and the provider events of one answer (see the module
        doc and attempts.py).

        Raises `UnknownModel`, the last attempt's `ProxyError`, and `Overloaded` when every
        deployment's breaker is open. `partial`: the answer so far of a stream taken over from
        a server that died; every attempt continues it (as after a cut, see attempts.py). Cancelling the consumer closes the upstream request.
        """
        model = request.model
        self._catalog.backends(model)  # raises UnknownModel
        route = self.route(model)
        groups = [model, *(m for m in route.fallbacks if m in self._catalog and m != model)]
        clock = self._clock
        attempts = Attempts(request, groups, self.route, self._deployments_of, self.budget, self._rng, clock(), partial)
        try:
            while True:
                step = attempts.next_step(clock())
                self._emit_notes(attempts)
                if isinstance(step, GiveUp):
                    raise step.error
                if step.wait_s > 0:
                    await self._sleep(step.wait_s)
                for out in attempts.start(clock()):
                    yield out
                if attempts.phase is Phase.IDLE:
                    continue  # its breaker opened while we waited: pick again
                try:
                    async with aclosing(step.deployment.backend.stream(step.request)) as events:
                        async for event in events:
                            for out in attempts.receive(event, clock()):
                                yield out
                            if attempts.phase is Phase.DONE:
                                return
                    outs = attempts.end_of_stream(clock())
                except ProxyError as exc:
                    outs = attempts.fail(exc, clock())
                self._emit_notes(attempts)
                for out in outs:
                    yield out
                if attempts.phase is Phase.FAILED:
                    raise attempts.error
        finally:
            attempts.close(clock())
            self._emit_notes(attempts)
