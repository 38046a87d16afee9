"""The attempt state machine, fed events: no sockets, no asyncio, a fake clock.

Each finding of issue 19 is a case here (and a scenario through the whole chain in
tests/integration/test_routing_scenarios.py)."""

from __future__ import annotations

import random

import pytest

from server.core.events import Attempt, AttemptEnded, Finished, FinishReason, Routed, TextDelta, ToolCallDelta, UsageReport
from server.core.request import ChatMessage, ChatRequest
from server.errors import (
    ContextLengthExceeded,
    Overloaded,
    RateLimited,
    StreamCut,
    UpstreamServerError,
    UpstreamTimeout,
)
from server.providers.base import DeploymentInfo
from server.routing.attempts import (
    TRANSITIONS,
    AttemptFailed,
    Attempts,
    BreakerMoved,
    DeploymentState,
    FailingOver,
    GiveUp,
    IllegalAttemptMove,
    Phase,
    Plan,
    Retrying,
    Usage,
    UsageParts,
)
from server.routing.policy import AfterFirstToken, BreakerPolicy, BudgetPolicy, ModelRoute, RetryBudget, RetryPolicy

FAST = RetryPolicy(max_attempts=3, backoff_base_s=0.02, backoff_max_s=0.2, deadline_s=5)


class FakeBackend:
    def __init__(self, name: str, weight: float = 1.0) -> None:
        self.info = DeploymentInfo(name, "openai", f"up-{name}", weight)


class World:
    """Models, their deployments and routes, and the shared per-deployment state."""

    def __init__(self, routes: dict[str, tuple[list[str], ModelRoute]], budget: BudgetPolicy | None = None) -> None:
        self.backends = {m: [FakeBackend(n) for n in names] for m, (names, _) in routes.items()}
        self.routes = {m: r for m, (_, r) in routes.items()}
        self.states: dict[int, DeploymentState] = {}
        self.budget = RetryBudget(budget or BudgetPolicy(min_concurrent=50))

    def deployments_of(self, model: str, policy: BreakerPolicy) -> list[DeploymentState]:
        return [self.states.setdefault(id(b), DeploymentState(b, policy)) for b in self.backends[model]]

    def state(self, name: str) -> DeploymentState:
        return next(s for s in self.states.values() if s.name == name)

    def attempts(self, model: str, now: float = 0.0, seed: int = 1) -> Attempts:
        groups = [model, *self.routes[model].fallbacks]
        request = ChatRequest(model, (ChatMessage("user", "hi"),))
        return Attempts(request, groups, self.routes.__getitem__, self.deployments_of, self.budget, random.Random(seed), now)


def words(n: int, offset: int = 0) -> list[str]:
    return [f" w{i}" for i in range(offset, offset + n)]


def plan(a: Attempts, now: float) -> Plan:
    step = a.next_step(now)
    assert isinstance(step, Plan), step
    return step


def send(a: Attempts, now: float) -> tuple[Plan, list]:
    """Plans and starts the next attempt; returns the plan and the client events of its start."""
    p = plan(a, now)
    return p, a.start(now + p.wait_s)


def feed(a: Attempts, events, now: float) -> list:
    out = []
    for e in events:
        out += a.receive(e, now)
    return out


def continuing_world(**route) -> World:
    primary = ModelRoute(after_first_token=AfterFirstToken.CONTINUE, fallbacks=("fb",), retry=FAST, **route)
    return World({"m": (["a"], primary), "fb": (["b"], ModelRoute(retry=FAST))})


# -- the table -----------------------------------------------------------------------------------


def test_every_phase_is_in_the_table_and_terminal_phases_only_close():
    assert set(TRANSITIONS) == set(Phase)
    for phase in (Phase.DONE, Phase.FAILED, Phase.CLOSED):
        assert set(TRANSITIONS[phase].values()) == {Phase.CLOSED}


def test_events_outside_an_attempt_are_illegal_moves():
    a = World({"m": (["a"], ModelRoute())}).attempts("m")
    with pytest.raises(IllegalAttemptMove):
        a.receive(TextDelta("x"), 0.0)
    with pytest.raises(IllegalAttemptMove):
        a.start(0.0)
    send(a, 0.0)
    with pytest.raises(IllegalAttemptMove):
        a.next_step(0.0)


def test_a_plain_answer_routes_on_its_first_event_and_finishes():
    w = World({"m": (["a"], ModelRoute())})
    a = w.attempts("m")
    p, started = send(a, 0.0)
    assert p.wait_s == 0 and started == [Attempt("openai", "up-a", "a")]
    out = feed(a, [TextDelta("hi"), UsageReport(5, 1), Finished(FinishReason.STOP)], 0.1)
    assert out == [Routed("openai", "up-a", "a"), TextDelta("hi"), UsageReport(5, 1), Finished(FinishReason.STOP)]
    assert a.phase is Phase.DONE and a.notes_to_emit() == []
    a.close(0.2)
    assert w.state("a").inflight == 0 and w.budget.active == 0


# -- finding 1: usage summed over the attempts ---------------------------------------------------


def test_a_cut_then_continued_answer_reports_the_usage_of_both_attempts():
    w = continuing_world()
    a = w.attempts("m")
    send(a, 0.0)
    feed(a, [TextDelta(t) for t in words(40)], 0.1)
    out = a.end_of_stream(0.2)  # cut without a usage report: its 40 content events count
    assert out == [UsageReport(0, 40, 0), AttemptEnded("a", UsageReport(0, 40, 0))] and a.phase is Phase.IDLE
    p, _ = send(a, 0.2)
    assert p.deployment.name == "b"
    out = feed(a, [TextDelta(t) for t in words(10, offset=40)] + [UsageReport(60, 10)], 0.3)
    assert out[-1] == UsageReport(60, 50, 0)  # the sum: the continuation's own 10 plus 40
    out = feed(a, [Finished(FinishReason.STOP)], 0.4)
    # each part for the client, the continuation's before the finish
    assert out == [AttemptEnded("b", UsageReport(60, 10, 0)), Finished(FinishReason.STOP)]
    notes = a.notes_to_emit()
    parts = [n for n in notes if isinstance(n, UsageParts)]
    assert parts == [UsageParts("m", (("a", Usage(0, 40, 0)), ("b", Usage(60, 10, 0))))]
    assert a.total_usage() == Usage(60, 50, 0)


def test_in_error_mode_a_cut_reports_its_partial_usage_and_fails():
    w = World({"m": (["a"], ModelRoute(retry=FAST)), "fb": (["b"], ModelRoute())})
    a = w.attempts("m")
    send(a, 0.0)
    feed(a, [TextDelta(t) for t in words(40)], 0.1)
    assert a.end_of_stream(0.2) == [UsageReport(0, 40, 0), AttemptEnded("a", UsageReport(0, 40, 0))]
    assert a.phase is Phase.FAILED and isinstance(a.error, StreamCut)


# -- finding 2: a continuation goes to another deployment first -----------------------------------


def test_a_mid_stream_failure_continues_on_another_deployment_at_once():
    w = continuing_world()
    a = w.attempts("m")
    send(a, 0.0)
    feed(a, [TextDelta(t) for t in words(3)], 0.1)
    a.fail(UpstreamTimeout("stalled"), 2.1)
    p = plan(a, 2.1)
    assert p.deployment.name == "b" and p.wait_s == 0
    assert p.request.messages[-2] == ChatMessage("assistant", "".join(words(3)))
    notes = a.notes_to_emit()
    assert [type(n) for n in notes] == [AttemptFailed, FailingOver]
    assert notes[1] == FailingOver("m", "a", "b", 2, 0, True)
    assert notes[0].after_content and notes[0].code == "timeout"


def test_the_failed_deployment_continues_only_when_no_other_remains_and_after_its_backoff():
    w = World({"m": (["a"], ModelRoute(after_first_token=AfterFirstToken.CONTINUE, retry=FAST))})
    a = w.attempts("m")
    send(a, 0.0)
    feed(a, [TextDelta("x")], 0.1)
    a.fail(RateLimited("slow down", retry_after_s=1.0), 0.2)
    p = plan(a, 0.2)
    assert p.deployment.name == "a" and p.wait_s >= 1.0  # its retry-after holds
    assert isinstance(a.notes_to_emit()[-1], Retrying)


def test_a_continuation_strips_what_repeats_and_sends_one_failover():
    w = continuing_world()
    a = w.attempts("m")
    send(a, 0.0)
    feed(a, [TextDelta(t) for t in words(5)], 0.1)
    a.end_of_stream(0.2)
    send(a, 0.2)
    out = feed(a, [TextDelta(t) for t in words(4, offset=3)] + [Finished(FinishReason.STOP)], 0.3)
    assert out[0] == Routed("openai", "up-b", "b")  # the core turns it into a failover frame
    text = "".join(e.text for e in out if isinstance(e, TextDelta))
    assert "".join(words(5)) + text == "".join(words(7))


def test_an_answer_with_a_tool_call_does_not_continue():
    w = continuing_world()
    a = w.attempts("m")
    send(a, 0.0)
    feed(a, [ToolCallDelta(0, "c1", "f", "{")], 0.1)
    a.end_of_stream(0.2)
    assert a.phase is Phase.FAILED


# -- finding 3: a finished answer is not continued -----------------------------------------------


def test_an_answer_that_finished_is_never_continued():
    w = continuing_world()
    a = w.attempts("m")
    send(a, 0.0)
    # the decoder turns finish_reason + usage without [DONE] into Finished (tests/unit/providers)
    feed(a, [TextDelta("x"), UsageReport(5, 1), Finished(FinishReason.STOP)], 0.1)
    assert a.phase is Phase.DONE
    with pytest.raises(IllegalAttemptMove):
        a.next_step(0.2)


# -- finding 4: no waiting where a fallback is ready; retry-after kept in overloaded --------------


def test_a_rate_limited_primary_yields_to_a_ready_fallback_without_waiting():
    w = World({"m": (["a"], ModelRoute(fallbacks=("fb",), retry=FAST)), "fb": (["b"], ModelRoute())})
    a = w.attempts("m")
    send(a, 0.0)
    a.fail(RateLimited("slow down", retry_after_s=1.0), 0.01)
    p = plan(a, 0.01)
    assert (p.deployment.name, p.wait_s) == ("b", 0.0)


def test_a_rate_limited_primary_without_a_fallback_is_waited_for():
    w = World({"m": (["a"], ModelRoute(retry=FAST))})
    a = w.attempts("m")
    send(a, 0.0)
    a.fail(RateLimited("slow down", retry_after_s=1.0), 0.01)
    p = plan(a, 0.01)
    assert p.deployment.name == "a" and p.wait_s >= 1.0


def test_a_500_is_retried_on_the_same_group_before_the_fallback():
    w = World({"m": (["a"], ModelRoute(fallbacks=("fb",), retry=FAST)), "fb": (["b"], ModelRoute())})
    a = w.attempts("m")
    send(a, 0.0)
    a.fail(UpstreamServerError("boom", status=500), 0.01)
    assert plan(a, 0.01).deployment.name == "a"


def test_overloaded_from_open_breakers_keeps_the_providers_retry_after():
    route = ModelRoute(retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(failures=1, cooldown_s=10))
    w = World({"m": (["a"], route)})
    a = w.attempts("m")
    send(a, 0.0)
    a.fail(RateLimited("slow down", retry_after_s=30.0), 0.0)
    assert [n for n in a.notes_to_emit() if isinstance(n, BreakerMoved)] == [BreakerMoved("a", "open")]
    a.next_step(0.0)
    a.close(0.0)
    step = w.attempts("m", now=1.0).next_step(1.0)
    assert isinstance(step, GiveUp) and isinstance(step.error, Overloaded)
    assert step.error.retry_after_s == pytest.approx(29.0)  # the provider's, not the cooldown's 9


def test_overloaded_without_a_retry_after_says_when_the_breaker_half_opens():
    route = ModelRoute(retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(failures=1, cooldown_s=10))
    w = World({"m": (["a"], route)})
    a = w.attempts("m")
    send(a, 0.0)
    a.fail(UpstreamServerError("boom", status=500), 0.0)
    step = w.attempts("m", now=4.0).next_step(4.0)
    assert isinstance(step, GiveUp) and step.error.retry_after_s == pytest.approx(6.0)


# -- finding 6: every attempt counts; a 400 names its deployment ----------------------------------


def test_every_attempt_yields_an_attempt_event_whether_it_answers_or_not():
    w = World({"m": (["a"], ModelRoute(retry=FAST))})
    a = w.attempts("m")
    _, first = send(a, 0.0)
    a.fail(UpstreamServerError("boom", status=500), 0.01)  # never answered: no Routed
    _, second = send(a, 0.2)
    out = feed(a, [TextDelta("x"), Finished(FinishReason.STOP)], 0.3)
    assert first == second == [Attempt("openai", "up-a", "a")] and a.attempts == 2
    assert [type(e) for e in out] == [Routed, TextDelta, Finished]


def test_a_non_retryable_error_fails_after_one_attempt_with_its_deployment_named():
    w = World({"m": (["a"], ModelRoute(fallbacks=("fb",), retry=FAST)), "fb": (["b"], ModelRoute())})
    a = w.attempts("m")
    _, started = send(a, 0.0)
    err = ContextLengthExceeded("openai: the prompt does not fit: maximum context length is 128000 tokens", status=400)
    assert a.fail(err, 0.01) == []
    assert a.phase is Phase.FAILED and a.error is err and started[0].deployment == "a"
    (note,) = a.notes_to_emit()
    assert isinstance(note, AttemptFailed) and (note.deployment, note.status, note.code) == ("a", 400, "context_length_exceeded")


# -- finding 7: notes for the operator ------------------------------------------------------------


def test_breaker_opening_and_closing_leave_one_note_each():
    route = ModelRoute(retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(failures=1, cooldown_s=1))
    w = World({"m": (["a"], route)})
    a = w.attempts("m")
    send(a, 0.0)
    a.fail(UpstreamServerError("boom", status=500), 0.0)
    assert [n for n in a.notes_to_emit() if isinstance(n, BreakerMoved)] == [BreakerMoved("a", "open")]
    a.next_step(0.0)
    a.close(0.0)
    b = w.attempts("m", now=1.5)
    send(b, 1.5)  # half-open: the probe
    feed(b, [TextDelta("x"), Finished(FinishReason.STOP)], 1.6)
    assert b.notes_to_emit() == [BreakerMoved("a", "closed")]


def test_cancelling_a_probe_releases_it_without_an_outcome():
    route = ModelRoute(retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(failures=1, cooldown_s=1))
    w = World({"m": (["a"], route)})
    a = w.attempts("m")
    send(a, 0.0)
    a.fail(UpstreamServerError("boom", status=500), 0.0)
    a.next_step(0.0)
    a.close(0.0)
    b = w.attempts("m", now=1.5)
    send(b, 1.5)
    feed(b, [TextDelta("x")], 1.6)
    b.close(1.7)  # the client went away
    dep = w.state("a")
    assert dep.inflight == 0 and dep.breaker.probes == 0 and b.phase is Phase.CLOSED
    assert b.notes_to_emit() == []


def test_a_retry_holds_a_budget_slot_until_its_first_token():
    w = World({"m": (["a"], ModelRoute(retry=FAST))})
    a = w.attempts("m")
    send(a, 0.0)
    a.fail(UpstreamServerError("boom", status=500), 0.01)
    send(a, 0.2)
    assert w.budget.retrying == 1
    feed(a, [TextDelta("x")], 0.3)
    assert w.budget.retrying == 0


def test_without_budget_the_last_error_goes_to_the_client():
    w = World({"m": (["a"], ModelRoute(retry=FAST))}, budget=BudgetPolicy(percent=0, min_concurrent=0))
    a = w.attempts("m")
    send(a, 0.0)
    err = UpstreamServerError("boom", status=500)
    a.fail(err, 0.01)
    step = a.next_step(0.01)
    assert isinstance(step, GiveUp) and step.error is err and a.phase is Phase.FAILED


def test_no_attempt_starts_after_the_deadline_but_each_continuation_gets_its_own():
    w = continuing_world()
    a = w.attempts("m")
    send(a, 0.0)
    feed(a, [TextDelta("x")], 0.1)
    a.fail(UpstreamTimeout("stalled"), 60.0)  # a long answer: the request's deadline (5 s) is past
    send(a, 60.0)  # the continuation's own deadline runs from the failure
    feed(a, [TextDelta("y")], 60.1)
    a.fail(UpstreamTimeout("stalled"), 120.0)
    step = plan(a, 120.0)  # the second continuation gets one too: "b" again, after its backoff
    assert step.deployment.name == "b"  # (groups already left behind are not gone back to)
    a.start(120.0 + step.wait_s)
    a.fail(UpstreamServerError("boom", status=500), 126.0)  # nothing delivered: the deadline stands
    step = a.next_step(126.0)
    assert isinstance(step, GiveUp)
