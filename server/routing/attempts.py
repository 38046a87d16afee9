"""The upstream attempts of one routed request, as a table-driven state machine. Sans-I/O.

Theory of operation. `Attempts` decides, and the router's async driver does. The driver asks
`next_step(now_s)` for a `Plan` (a deployment, the request to send it, the wait before it) or a
`GiveUp` (the error for the client); it sleeps the wait, calls `start()` (the breaker may have
opened meanwhile: then it asks again), opens the upstream call, feeds every provider event to
`receive()` and the attempt's end to `fail()` / `end_of_stream()`, and yields the client events
each of them returns. `close()` is its `finally`: whatever is still held (a breaker probe, a
retry-budget slot, the in-flight count) is released, and a cancelled attempt counts neither as a
success nor a failure. This module imports no asyncio or httpx and reads no clock.

    IDLE --PLAN--> WAITING --SEND--> CONNECTING --ANSWER--> ANSWERING --CONTENT--> STREAMING
    WAITING --REFUSED (its breaker opened meanwhile)--> IDLE
    CONNECTING, ANSWERING, STREAMING --RETRY--> IDLE (another attempt may follow)
                                     --FATAL--> FAILED (not retryable; content and no continuation)
    ANSWERING, STREAMING --FINISH--> DONE;   IDLE --GIVE_UP--> FAILED;   any --CLOSE--> CLOSED

Which deployment next (`_pick`), in this order:
1. a deployment of the current group not yet tried by this request and not cooling down after a
   `retry-after`: no wait;
2. when the answer is being continued (content reached the client), or when every deployment of
   the current group is cooling down after a `retry-after`: such a fresh deployment of a later
   group (a fallback), with no wait: a continuation goes to another deployment first, and a
   rate-limited primary costs no waiting when a fallback is ready;
3. a retry in the current group, after its backoff (full jitter, never before its retry-after),
   then the later groups the same way.
No attempt starts after the deadline: `retry.deadline_s` after the request began, or after the
failure of an attempt that had delivered content (each continuation gets one of its own).
Every attempt after the first needs a slot of the shared retry budget.

Usage. Each attempt's usage is its provider's last report per field, and for an attempt that
relayed content without a completion count, the number of content events it delivered (a lower
bound). The client's usage is the sum over every attempt so far: a `UsageReport` of the sum goes
out whenever the current attempt reports, and when an attempt that answered fails. Each attempt's
own usage goes out as an `AttemptEnded` when it fails after answering, and when it finishes after
an earlier attempt answered (so a stream served by one attempt costs no extra event); the stream
reports them one by one next to their sum (`attempts_usage` in `done` and `error`).

Operator notes. Every failed attempt, retry, failover, continuation and breaker opening or
closing leaves one `Note` in `notes_to_emit()` (never one per token); the driver logs them and
feeds the metrics.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.core.events import (
    Attempt,
    AttemptEnded,
    Finished,
    ProviderEvent,
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
from server.routing.breaker import Breaker, Permit
from server.routing.policy import (
    AfterFirstToken,
    BreakerPolicy,
    Candidate,
    ModelRoute,
    OverlapStripper,
    RetryBudget,
    choose,
    continuation_request,
    ewma,
    retry_delay_s,
)


class DeploymentState:
    """The live routing state of one backend, shared by every request (owned by the router)."""

    __slots__ = ("backend", "breaker", "inflight", "ttft_s", "not_before")

    def __init__(self, backend: Backend, policy: BreakerPolicy) -> None:
        self.backend = backend
        self.breaker = Breaker(policy)
        self.inflight = 0
        self.ttft_s: float | None = None
        self.not_before = 0.0  # cooling down after a retry-after until this time

    @property
    def name(self) -> str:
        return self.backend.info.name

    def candidate(self) -> Candidate:
        return Candidate(self.backend.info.weight, self.inflight, self.ttft_s)

    def available_at(self, now_s: float) -> float:
        """When an attempt could start here: the later of the breaker's reopening and the
        provider's retry-after (`now_s` when both allow one now)."""
        return max(now_s, self.breaker.open_until(now_s), self.not_before)


# -- the machine ---------------------------------------------------------------------------------


class Phase(enum.Enum):
    IDLE = "idle"  # no attempt running: pick the next one (or give up)
    WAITING = "waiting"  # an attempt is planned: its backoff / retry-after first
    CONNECTING = "connecting"  # the attempt is sent, nothing received yet
    ANSWERING = "answering"  # the attempt answered (Routed went out), no content from it yet
    STREAMING = "streaming"  # the attempt's content reaches the client
    DONE = "done"
    FAILED = "failed"
    CLOSED = "closed"  # the driver stopped (cancelled, or after DONE / FAILED)


class Move(enum.Enum):
    PLAN = "plan"
    GIVE_UP = "give_up"
    SEND = "send"
    REFUSED = "refused"  # the breaker opened while the attempt waited
    ANSWER = "answer"  # the attempt's first event
    CONTENT = "content"
    FINISH = "finish"
    RETRY = "retry"  # the attempt failed; another may follow
    FATAL = "fatal"  # the attempt failed; the stream fails with it
    CLOSE = "close"


_RUNNING = {Move.RETRY: Phase.IDLE, Move.FATAL: Phase.FAILED, Move.CLOSE: Phase.CLOSED}

TRANSITIONS: dict[Phase, dict[Move, Phase]] = {
    Phase.IDLE: {Move.PLAN: Phase.WAITING, Move.GIVE_UP: Phase.FAILED, Move.CLOSE: Phase.CLOSED},
    Phase.WAITING: {Move.SEND: Phase.CONNECTING, Move.REFUSED: Phase.IDLE, Move.CLOSE: Phase.CLOSED},
    Phase.CONNECTING: {Move.ANSWER: Phase.ANSWERING, **_RUNNING},
    Phase.ANSWERING: {Move.CONTENT: Phase.STREAMING, Move.FINISH: Phase.DONE, **_RUNNING},
    Phase.STREAMING: {Move.CONTENT: Phase.STREAMING, Move.FINISH: Phase.DONE, **_RUNNING},
    Phase.DONE: {Move.CLOSE: Phase.CLOSED},
    Phase.FAILED: {Move.CLOSE: Phase.CLOSED},
    Phase.CLOSED: {Move.CLOSE: Phase.CLOSED},
}


class IllegalAttemptMove(Exception):
    """A call the machine's phase does not allow: a bug in the driver."""


@dataclass(frozen=True, slots=True)
class Plan:
    """The next attempt: send `request` to `deployment` after `wait_s` seconds."""

    deployment: DeploymentState
    request: ChatRequest
    wait_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No attempt follows: the client gets `error`."""

    error: ProxyError


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )

    def report(self) -> UsageReport:
        return UsageReport(self.prompt_tokens, self.completion_tokens, self.reasoning_tokens)


# -- operator notes: one per event, never per token ----------------------------------------------


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    model: str
    deployment: str
    attempt: int  # 1 for the request's first attempt
    code: str  # the error code ("rate_limited", "timeout", ...)
    status: int  # the upstream HTTP status, 0 without one
    after_content: bool  # the attempt had delivered content
    elapsed_ms: int
    message: str


@dataclass(frozen=True, slots=True)
class Retrying:
    """The next attempt goes to a deployment this request already tried."""

    model: str
    deployment: str
    attempt: int
    wait_ms: int


@dataclass(frozen=True, slots=True)
class FailingOver:
    """The next attempt goes to another deployment than the last one; `continuation` when it
    continues an answer the client already has part of."""

    model: str
    from_deployment: str
    deployment: str
    attempt: int
    wait_ms: int
    continuation: bool


@dataclass(frozen=True, slots=True)
class BreakerMoved:
    deployment: str
    state: str  # "open" | "closed"


@dataclass(frozen=True, slots=True)
class UsageParts:
    """A stream served by several attempts ended: the usage of each attempt that answered."""

    model: str
    parts: tuple[tuple[str, Usage], ...]  # (deployment, usage) in attempt order


Note = AttemptFailed | Retrying | FailingOver | BreakerMoved | UsageParts

def _breaker_outcome(exc: ProxyError) -> bool | None:
    """True: the upstream answered properly (even if it refused the request); False: the
    deployment failed; None: no upstream outcome (the request could not be built)."""
    if not isinstance(exc, UpstreamError):
        return None
    if isinstance(exc, UpstreamUnauthenticated):
        return False  # our key is refused: every request to it will fail
    return not exc.retryable


class Attempts:
    """The attempts of one request. Not thread-safe; one driver feeds it."""

    def __init__(
        self,
        request: ChatRequest,
        groups: Sequence[str],
        route_of: Callable[[str], ModelRoute],
        deployments_of: Callable[[str, BreakerPolicy], list[DeploymentState]],
        budget: RetryBudget,
        rng: random.Random,
        now_s: float,
        partial: str = "",
    ) -> None:
        self.request = request
        self.phase = Phase.IDLE
        self._groups = list(groups)
        self._routes = [route_of(g) for g in self._groups]
        self._deployments_of = deployments_of
        self._budget = budget
        self._rng = rng
        self._route = self._routes[0]
        self._deadline = now_s + self._route.retry.deadline_s
        self._per_group = [0] * len(self._groups)
        self._tried: set[int] = set()
        self._group = 0
        self.attempts = 0  # attempts started (sent)
        self._last_error: ProxyError | None = None
        self._notes: list[Note] = []
        budget.start_request(now_s)
        # content the client has
        # `partial`: an answer another server began (it died; this one took the stream over):
        # the first attempt already continues it.
        self._partial: list[str] = [partial] if partial else []  # its text
        self._delivered = 1 if partial else 0  # content events relayed, every attempt
        self._not_text = 0  # of them, reasoning or tool calls (an answer that cannot continue)
        # the usage of every finished attempt that answered
        self._parts: list[tuple[str, Usage]] = []
        # the current attempt
        self._plan: Plan | None = None
        self._permit: Permit | None = None
        self._holding_budget = False
        self._started_s = 0.0
        self._stripper: OverlapStripper | None = None
        self._received = 0  # content events received from this attempt (before stripping)
        self._usage = Usage()  # its last report per field
        self._last_deployment = ""

    # -- moves -----------------------------------------------------------------------------------

    def _move(self, move: Move) -> None:
        try:
            self.phase = TRANSITIONS[self.phase][move]
        except KeyError:
            raise IllegalAttemptMove(f"{move.value} in phase {self.phase.value}") from None

    def notes_to_emit(self) -> list[Note]:
        notes, self._notes = self._notes, []
        return notes

    @property
    def error(self) -> ProxyError:
        """The error that failed the stream (in FAILED: the last attempt's)."""
        if self._last_error is None:
            raise IllegalAttemptMove(f"no error in phase {self.phase.value}")
        return self._last_error

    @property
    def continuing(self) -> bool:
        """Content reached the client: the next attempt continues the answer."""
        return self._delivered > 0

    def total_usage(self) -> Usage:
        total = Usage()
        for _, usage in self._parts:
            total = total + usage
        return total

    # -- planning --------------------------------------------------------------------------------

    def next_step(self, now_s: float) -> Plan | GiveUp:
        """IDLE -> WAITING with a `Plan`, or -> FAILED with `GiveUp`."""
        if self.phase is not Phase.IDLE:
            raise IllegalAttemptMove(f"next_step in phase {self.phase.value}")
        pick = self._pick(now_s)
        if pick is None:
            return self._give_up(self._last_error or self._overloaded(now_s))
        group, dep, wait_s = pick
        if self.attempts:
            if not self._budget.try_acquire(now_s):
                assert self._last_error is not None
                return self._give_up(self._last_error)
            self._holding_budget = True
        self._group = group
        request = self.request
        self._stripper = None
        if self.continuing:
            text = "".join(self._partial)
            request = continuation_request(self.request, text)
            self._stripper = OverlapStripper(text)
        if self.attempts:
            wait_ms = int(wait_s * 1000)
            if dep.name == self._last_deployment:
                self._notes.append(Retrying(self.request.model, dep.name, self.attempts + 1, wait_ms))
            else:
                self._notes.append(
                    FailingOver(self.request.model, self._last_deployment, dep.name, self.attempts + 1, wait_ms, self.continuing)
                )
        self._plan = Plan(dep, request, wait_s)
        self._move(Move.PLAN)
        return self._plan

    def _give_up(self, error: ProxyError) -> GiveUp:
        self._move(Move.GIVE_UP)
        return GiveUp(error)

    def _overloaded(self, now_s: float) -> Overloaded:
        """Every deployment's breaker is open: when one could take an attempt again, as the
        client's retry-after (the provider's own retry-after when it is the later)."""
        soonest: float | None = None
        for g, name in enumerate(self._groups):
            for dep in self._deployments_of(name, self._routes[g].breaker):
                at = dep.available_at(now_s)
                soonest = at if soonest is None else min(soonest, at)
        wait = (soonest - now_s) if soonest is not None and soonest > now_s else None
        return Overloaded(f"no deployment of {self.request.model!r} is available (circuit open)", retry_after_s=wait)

    def _pick(self, now_s: float) -> tuple[int, DeploymentState, float] | None:
        """The next attempt: (group index, deployment, wait before it), or None."""
        if now_s > self._deadline:
            return None
        usable: list[list[DeploymentState]] = []
        for g, name in enumerate(self._groups):
            if g < self._group or self._per_group[g] >= self._routes[g].retry.max_attempts:
                usable.append([])
                continue
            usable.append([d for d in self._deployments_of(name, self._routes[g].breaker) if d.breaker.available(now_s)])
        # 1. fresh and ready in the current group
        fresh = self._fresh(usable[self._group], now_s)
        if fresh:
            return self._group, self._choose(self._group, fresh), 0.0
        # 2. fresh and ready in a later group, when continuing or when the current group is
        # cooling down after a retry-after
        current = usable[self._group]
        cooling = bool(current) and all(d.not_before > now_s for d in current)
        if self.continuing or cooling:
            for g in range(self._group + 1, len(self._groups)):
                fresh = self._fresh(usable[g], now_s)
                if fresh:
                    return g, self._choose(g, fresh), 0.0
        # 3. retries in order, within the deadline
        for g in range(self._group, len(self._groups)):
            deps = usable[g]
            if not deps:
                continue
            ready = [d for d in deps if d.not_before <= now_s]
            dep = self._choose(g, ready) if ready else min(deps, key=lambda d: d.not_before)
            delay = max(dep.not_before - now_s, 0.0)
            if id(dep) in self._tried:
                delay = max(delay, retry_delay_s(self.attempts, self._routes[g].retry, self._rng))
            if now_s + delay <= self._deadline:
                return g, dep, delay
        return None

    def _fresh(self, deps: list[DeploymentState], now_s: float) -> list[DeploymentState]:
        return [d for d in deps if id(d) not in self._tried and d.not_before <= now_s]

    def _choose(self, group: int, deps: list[DeploymentState]) -> DeploymentState:
        return deps[choose(self._routes[group].strategy, [d.candidate() for d in deps], self._rng)]

    # -- the attempt -----------------------------------------------------------------------------

    def start(self, now_s: float) -> list[StreamEvent]:
        """WAITING -> CONNECTING (returns the `Attempt` event for the client), or back to IDLE
        when the deployment's breaker no longer lets an attempt through (returns nothing)."""
        plan = self._plan
        if self.phase is not Phase.WAITING or plan is None:
            raise IllegalAttemptMove(f"start in phase {self.phase.value}")
        dep = plan.deployment
        permit = dep.breaker.allow(now_s)
        if permit is None:
            self._release_budget()
            self._plan = None
            self._move(Move.REFUSED)
            return []
        self._move(Move.SEND)
        self._permit = permit
        self._per_group[self._group] += 1
        self.attempts += 1
        self._tried.add(id(dep))
        self._started_s = now_s
        self._received = 0
        self._usage = Usage()
        self._last_deployment = dep.name
        dep.inflight += 1
        info = dep.backend.info
        return [Attempt(info.provider, info.upstream_model, info.name)]

    def receive(self, event: ProviderEvent, now_s: float) -> list[StreamEvent]:
        """One provider event of the current attempt; the events for the client."""
        plan = self._plan
        if plan is None or self.phase not in (Phase.CONNECTING, Phase.ANSWERING, Phase.STREAMING):
            raise IllegalAttemptMove(f"{type(event).__name__} in phase {self.phase.value}")
        out: list[StreamEvent] = []
        if self.phase is Phase.CONNECTING:
            self._move(Move.ANSWER)
            info = plan.deployment.backend.info
            out.append(Routed(info.provider, info.upstream_model, info.name))
        cls = type(event)
        if cls is TextDelta or cls is ReasoningDelta or cls is ToolCallDelta:
            self._move(Move.CONTENT)
            self._received += 1
            if self._received == 1:
                dep = plan.deployment
                dep.ttft_s = ewma(dep.ttft_s, now_s - self._started_s)
                self._release_budget()
            if cls is TextDelta:
                assert isinstance(event, TextDelta)
                if self._stripper is not None:
                    kept = self._stripper.feed(event.text)
                    if not kept:
                        return out
                    if kept is not event.text:
                        event = TextDelta(kept)
                self._partial.append(event.text)
            else:
                self._not_text += 1
            self._delivered += 1
            out.append(event)
        elif cls is UsageReport:
            assert isinstance(event, UsageReport)
            u = self._usage
            self._usage = Usage(
                event.prompt_tokens or u.prompt_tokens,
                event.completion_tokens or u.completion_tokens,
                event.reasoning_tokens or u.reasoning_tokens,
            )
            total = self.total_usage() + self._usage
            out.append(total.report() if self._parts else event)
        elif cls is Finished:
            if self._stripper is not None and (rest := self._stripper.flush()):
                self._partial.append(rest)
                self._delivered += 1
                out.append(TextDelta(rest))
            self._move(Move.FINISH)
            part = self._end_attempt(True, now_s)
            if part is not None and len(self._parts) > 1:
                out.append(part)
            self._note_parts()
            out.append(event)
        else:
            out.append(event)
        return out

    def end_of_stream(self, now_s: float) -> list[StreamEvent]:
        """The attempt's events ended without `Finished`: a cut stream."""
        info = self._plan.deployment.backend.info if self._plan is not None else None
        provider = info.provider if info is not None else "the provider"
        return self.fail(StreamCut(f"the stream of {provider} ended without its finish event"), now_s)

    def fail(self, error: ProxyError, now_s: float) -> list[StreamEvent]:
        """The current attempt failed with `error`. Moves to IDLE (another attempt may follow:
        call `next_step`) or FAILED (raise `error`). Returns events for the client (the usage
        so far, when this attempt had answered)."""
        plan = self._plan
        if plan is None or self.phase not in (Phase.CONNECTING, Phase.ANSWERING, Phase.STREAMING):
            raise IllegalAttemptMove(f"fail in phase {self.phase.value}")
        dep = plan.deployment
        answered = self.phase is not Phase.CONNECTING
        after_content = self._received > 0
        if error.retry_after_s:
            dep.not_before = max(dep.not_before, now_s + error.retry_after_s)
        status = error.status if isinstance(error, UpstreamError) else 0
        self._notes.append(
            AttemptFailed(
                self.request.model, dep.name, self.attempts, error.code.value, status, after_content,
                int((now_s - self._started_s) * 1000), error.message,
            )
        )
        self._last_error = error
        outcome = _breaker_outcome(error)
        part = self._end_attempt(outcome, now_s)
        out: list[StreamEvent] = [self.total_usage().report()] if answered else []
        if part is not None:
            out.append(part)
        route = self._route  # the requested model's: its fallbacks' own settings do not apply
        fatal = not error.retryable or (
            self.continuing and (route.after_first_token is AfterFirstToken.ERROR or self._not_text > 0)
        )
        if fatal:
            self._move(Move.FATAL)
            self._note_parts()
            return out
        if after_content:  # a continuation gets a deadline of its own
            self._deadline = now_s + route.retry.deadline_s
        self._move(Move.RETRY)
        return out

    def close(self, now_s: float) -> None:
        """The driver stopped (its `finally`). An attempt still running was cancelled: it
        counts neither as a success nor as a failure."""
        if self.phase in (Phase.CONNECTING, Phase.ANSWERING, Phase.STREAMING):
            self._end_attempt(None, now_s, keep_usage=False)
        self._release_budget()
        if self.phase is not Phase.CLOSED:
            self._budget.end_request()
        self._plan = None
        self._move(Move.CLOSE)

    def _end_attempt(self, outcome: bool | None, now_s: float, keep_usage: bool = True) -> AttemptEnded | None:
        """Releases what the attempt held and keeps its usage when it answered (returned as the
        event for the client; None when it had not answered or `keep_usage` is off)."""
        plan, permit = self._plan, self._permit
        assert plan is not None and permit is not None
        dep = plan.deployment
        dep.inflight -= 1
        self._release_budget()
        self._permit = None
        if outcome is None:
            dep.breaker.release(permit)
        else:
            opened, closed = dep.breaker.opened, dep.breaker.closed
            dep.breaker.record(permit, outcome, now_s)
            if dep.breaker.opened != opened:
                self._notes.append(BreakerMoved(dep.name, "open"))
            if dep.breaker.closed != closed:
                self._notes.append(BreakerMoved(dep.name, "closed"))
        if keep_usage and self.phase is not Phase.CONNECTING:
            u = self._usage
            if not u.completion_tokens and self._received:
                u = Usage(u.prompt_tokens, self._received, u.reasoning_tokens)
            self._parts.append((dep.name, u))
            return AttemptEnded(dep.name, u.report())
        return None

    def _release_budget(self) -> None:
        if self._holding_budget:
            self._holding_budget = False
            self._budget.release()

    def _note_parts(self) -> None:
        if len(self._parts) > 1:
            self._notes.append(UsageParts(self.request.model, tuple(self._parts)))
