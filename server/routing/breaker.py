"""A circuit breaker per deployment, as a table-driven state machine. Sans-I/O.

Theory of operation. CLOSED lets every attempt through and records outcomes: `failures`
consecutive failures, or an error rate of at least `error_rate` over the outcomes of the last
`window_s` seconds (with at least `min_requests` of them), trip it OPEN. OPEN refuses attempts
until `cooldown_s` has passed, then it is HALF_OPEN: up to `half_open_probes` attempts at once
go through; a probe's success closes the breaker, its failure opens it again for another
cooldown. Outcomes of attempts that started before the breaker opened do not move it.

Every move goes through TRANSITIONS; anything else raises `IllegalBreakerMove`. Times are
monotonic seconds passed in by the caller: this module never reads a clock.
"""

from __future__ import annotations

import enum
from collections import deque

from server.routing.policy import BreakerPolicy


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Move(enum.Enum):
    TRIP = "trip"  # thresholds crossed (closed) or a probe failed (half-open)
    COOL = "cool"  # the cooldown is over
    RECOVER = "recover"  # a probe succeeded


TRANSITIONS: dict[BreakerState, dict[Move, BreakerState]] = {
    BreakerState.CLOSED: {Move.TRIP: BreakerState.OPEN},
    BreakerState.OPEN: {Move.COOL: BreakerState.HALF_OPEN},
    BreakerState.HALF_OPEN: {Move.TRIP: BreakerState.OPEN, Move.RECOVER: BreakerState.CLOSED},
}


class IllegalBreakerMove(Exception):
    """A move the breaker's state does not allow: a bug in the caller."""


class Permit(enum.Enum):
    """What `allow()` granted: a normal attempt or a half-open probe."""

    NORMAL = "normal"
    PROBE = "probe"


class Breaker:
    __slots__ = ("policy", "state", "consecutive", "opened_at", "probes", "_window", "_failed", "opened", "closed")

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.probes = 0  # probes in flight
        self._window: deque[tuple[float, bool]] = deque()
        self._failed = 0  # failures in the window
        self.opened = 0  # how many times it opened / closed (metrics, tests)
        self.closed = 0

    def _move(self, move: Move, now_s: float) -> None:
        try:
            self.state = TRANSITIONS[self.state][move]
        except KeyError:
            raise IllegalBreakerMove(f"{move.value} in state {self.state.value}") from None
        if self.state is BreakerState.OPEN:
            self.opened_at = now_s
            self.opened += 1
            self.probes = 0
        elif self.state is BreakerState.CLOSED:
            self.closed += 1
            self.consecutive = 0
            self._window.clear()
            self._failed = 0

    def current(self, now_s: float) -> BreakerState:
        """The state at `now_s` (an elapsed cooldown makes OPEN half-open)."""
        if self.state is BreakerState.OPEN and now_s - self.opened_at >= self.policy.cooldown_s:
            self._move(Move.COOL, now_s)
        return self.state

    def peek(self, now_s: float) -> BreakerState:
        """The state at `now_s` without moving the breaker (safe from another thread, such as
        the metrics server's)."""
        state = self.state
        if state is BreakerState.OPEN and now_s - self.opened_at >= self.policy.cooldown_s:
            return BreakerState.HALF_OPEN
        return state

    def open_until(self, now_s: float) -> float:
        """When an open breaker turns half-open (`now_s` when it is not open)."""
        if self.current(now_s) is BreakerState.OPEN:
            return self.opened_at + self.policy.cooldown_s
        return now_s

    def available(self, now_s: float) -> bool:
        """Whether `allow()` would grant an attempt now (does not take a probe slot)."""
        state = self.current(now_s)
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and self.probes < self.policy.half_open_probes

    def allow(self, now_s: float) -> Permit | None:
        """Grants an attempt, or None while open (or every probe slot is taken)."""
        if not self.available(now_s):
            return None
        if self.state is BreakerState.HALF_OPEN:
            self.probes += 1
            return Permit.PROBE
        return Permit.NORMAL

    def release(self, permit: Permit) -> None:
        """The attempt ended without an outcome (cancelled)."""
        if permit is Permit.PROBE and self.state is BreakerState.HALF_OPEN:
            self.probes -= 1

    def record(self, permit: Permit, ok: bool, now_s: float) -> None:
        """The outcome of an attempt granted by `allow()`."""
        if permit is Permit.PROBE:
            if self.state is BreakerState.HALF_OPEN:
                self.probes -= 1
                self._move(Move.RECOVER if ok else Move.TRIP, now_s)
            return
        if self.state is not BreakerState.CLOSED:
            return  # started before the breaker opened
        self.consecutive = 0 if ok else self.consecutive + 1
        window = self._window
        window.append((now_s, ok))
        self._failed += not ok  # a running count: no scan of the window per request
        while window and window[0][0] < now_s - self.policy.window_s:
            self._failed -= not window.popleft()[1]
        if self.consecutive >= self.policy.failures:
            self._move(Move.TRIP, now_s)
        elif len(window) >= self.policy.min_requests and self._failed / len(window) >= self.policy.error_rate:
            self._move(Move.TRIP, now_s)
