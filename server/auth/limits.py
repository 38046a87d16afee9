"""Per-key limits. Sans-I/O: every call takes the time (`now_s`, wall-clock seconds) from the
caller, so tests drive a fake clock and nothing here sleeps or reads a clock.

    admit(key_id, limits, model, live_streams, now_s)   before a stream starts; raises a typed
                                                        error or records the request
    charge(key_id, tokens, now_s)                       completion tokens of a stream that ended
    open_connection / close_connection                  calls held by the key

Windows. Requests and tokens per minute use a sliding 60 s window (timestamps in a deque, so a
burst at the end of one minute cannot be followed by a full minute's worth at the start of the
next). The token budget uses fixed periods aligned to the epoch (`budget_period_s` = 86400 is
a UTC day), so `retry_after_s` is the start of the next period. Tokens are counted as streams
end, so a stream running when the budget runs out finishes; the next one is refused.

Zero means "no limit" for every number. State lives in this process (one server); several
servers would keep these counters in Redis (DESIGN.md, Scale).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from server.errors import ForbiddenModel, KeyRateLimited, QuotaExceeded, TooManyConnections, TooManyStreams

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class KeyLimits:
    models: frozenset[str] = frozenset()  # allowed public model names; empty: every model
    rpm: int = 0  # stream starts per minute
    tpm: int = 0  # completion tokens per minute
    concurrency: int = 0  # live streams at once, over all the key's sessions
    connections: int = 0  # open Stream calls (WebSocket connections) at once
    budget_tokens: int = 0  # completion tokens per budget period
    budget_period_s: int = 86_400


@dataclass(slots=True)
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    tokens_in_window: int = 0
    period: int = -1
    period_tokens: int = 0
    connections: int = 0


class KeyLimiter:
    def __init__(self) -> None:
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key_id: str) -> _KeyState:
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()
        return state

    def admit(self, key_id: str, limits: KeyLimits, model: str, live_streams: int, now_s: float) -> None:
        """Admits one stream start, or raises `ForbiddenModel`, `TooManyStreams`,
        `KeyRateLimited` or `QuotaExceeded` (the last two with `retry_after_s`)."""
        if limits.models and model not in limits.models:
            raise ForbiddenModel(f"this API key may not use model {model!r}")
        if limits.concurrency and live_streams >= limits.concurrency:
            raise TooManyStreams(f"this API key may run at most {limits.concurrency} streams at once")
        state = self._state(key_id)
        self._slide(state, now_s)
        if limits.rpm and len(state.requests) >= limits.rpm:
            retry = state.requests[len(state.requests) - limits.rpm] + WINDOW_S - now_s
            raise KeyRateLimited(f"this API key may start {limits.rpm} streams per minute", retry_after_s=_ceil(retry))
        if limits.tpm and state.tokens_in_window >= limits.tpm:
            raise KeyRateLimited(
                f"this API key may use {limits.tpm} tokens per minute", retry_after_s=_ceil(self._tokens_free_at(state, limits.tpm) - now_s)
            )
        if limits.budget_tokens:
            self._roll(state, limits.budget_period_s, now_s)
            if state.period_tokens >= limits.budget_tokens:
                next_period_s = (state.period + 1) * limits.budget_period_s
                raise QuotaExceeded(
                    f"this API key's budget of {limits.budget_tokens} tokens per {limits.budget_period_s} s is spent",
                    retry_after_s=_ceil(next_period_s - now_s),
                )
        state.requests.append(now_s)

    def charge(self, key_id: str, tokens: int, limits: KeyLimits, now_s: float) -> None:
        """Counts the completion tokens of a stream that ended."""
        if tokens <= 0:
            return
        state = self._state(key_id)
        state.tokens.append((now_s, tokens))
        state.tokens_in_window += tokens
        self._roll(state, limits.budget_period_s, now_s)
        state.period_tokens += tokens

    def open_connection(self, key_id: str, limits: KeyLimits) -> None:
        """Raises `TooManyConnections` when the key holds its maximum; pair with close."""
        state = self._state(key_id)
        if limits.connections and state.connections >= limits.connections:
            raise TooManyConnections(f"this API key may hold at most {limits.connections} connections", retry_after_s=1.0)
        state.connections += 1

    def close_connection(self, key_id: str) -> None:
        state = self._keys.get(key_id)
        if state is not None and state.connections > 0:
            state.connections -= 1

    def connections(self, key_id: str) -> int:
        """The key's open connections on this server."""
        state = self._keys.get(key_id)
        return state.connections if state is not None else 0

    def usage(self, key_id: str, now_s: float) -> tuple[int, int, int]:
        """(requests, tokens) in the last minute and tokens in the current budget period."""
        state = self._state(key_id)
        self._slide(state, now_s)
        return len(state.requests), state.tokens_in_window, state.period_tokens

    @staticmethod
    def _slide(state: _KeyState, now_s: float) -> None:
        horizon = now_s - WINDOW_S
        while state.requests and state.requests[0] <= horizon:
            state.requests.popleft()
        while state.tokens and state.tokens[0][0] <= horizon:
            state.tokens_in_window -= state.tokens.popleft()[1]

    @staticmethod
    def _tokens_free_at(state: _KeyState, tpm: int) -> float:
        """When enough tokens leave the window that the key is under `tpm` again."""
        remaining = state.tokens_in_window
        for at, n in state.tokens:
            remaining -= n
            if remaining < tpm:
                return at + WINDOW_S
        return state.tokens[-1][0] + WINDOW_S if state.tokens else 0.0

    @staticmethod
    def _roll(state: _KeyState, period_s: int, now_s: float) -> None:
        period = int(now_s // max(1, period_s))
        if period != state.period:
            state.period = period
            state.period_tokens = 0


def _ceil(seconds: float) -> float:
    """Retry-after in whole milliseconds, never below one (a zero would invite a hot loop)."""
    return max(0.001, math.ceil(seconds * 1000) / 1000)
