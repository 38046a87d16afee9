"""Routing policy: what a model's routing is configured to do, and the pure decisions it makes.

Sans-I/O: no asyncio, no clock, no random module state. Callers pass `now_s` (monotonic
seconds) and an `rng` (a `random.Random`), so every decision is reproducible in a unit test.

- `ModelRoute`: per public model: strategy, ordered fallbacks, what to do after the first token,
  the retry policy and the breaker policy of its deployments.
- `choose()`: one deployment among candidates by strategy (weighted random, least in-flight,
  lowest EWMA time to first token).
- `retry_delay_s()`: exponential backoff with full jitter (AWS architecture blog, "Exponential
  Backoff And Jitter"), never shorter than the provider's `retry-after`.
- `RetryBudget`: retries in flight at most `percent` of active requests, at least
  `min_concurrent` (Envoy's `retry_budget`), and retries over a window at most `percent` of
  the requests in it, so a 429 storm is not amplified.
- `OverlapStripper`: the start of a continuation minus what repeats the partial answer.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from server.catalog import Catalog
from server.core.request import ChatMessage, ChatRequest
from server.providers.base import Backend


class Strategy(enum.Enum):
    WEIGHTED = "weighted"
    LEAST_INFLIGHT = "least_inflight"
    LOWEST_LATENCY = "lowest_latency"


class AfterFirstToken(enum.Enum):
    """What a failure after the first token does: fail with the partial usage, or continue the
    answer on another deployment."""

    ERROR = "error"
    CONTINUE = "continue"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`max_attempts`: attempts per model group (the model, then each fallback), first included.
    `deadline_s`: no attempt starts (and no backoff ends) later than this after the request
    began, or after the failure that triggers a continuation."""

    max_attempts: int = 3
    backoff_base_s: float = 0.1
    backoff_max_s: float = 2.0
    deadline_s: float = 30.0


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    percent: float = 20.0
    min_concurrent: int = 3


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Opens after `failures` consecutive failures, or when at least `min_requests` outcomes in
    the last `window_s` seconds have an error rate >= `error_rate`; stays open `cooldown_s`;
    then lets `half_open_probes` attempts through, closing on a success."""

    failures: int = 5
    error_rate: float = 0.5
    window_s: float = 30.0
    min_requests: int = 20
    cooldown_s: float = 10.0
    half_open_probes: int = 1


@dataclass(frozen=True, slots=True)
class ModelRoute:
    strategy: Strategy = Strategy.WEIGHTED
    fallbacks: tuple[str, ...] = ()
    after_first_token: AfterFirstToken = AfterFirstToken.ERROR
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)


class RoutingCatalog(Catalog):
    """A catalog that also carries each model's routing (built by server.config)."""

    def __init__(
        self,
        models: Mapping[str, Sequence[Backend]],
        routes: Mapping[str, ModelRoute] | None = None,
        budget: BudgetPolicy | None = None,
        default_route: ModelRoute | None = None,
    ) -> None:
        super().__init__(models)
        self._routes = dict(routes or {})
        self._default = default_route or ModelRoute()
        self.budget = budget or BudgetPolicy()

    def route(self, model: str) -> ModelRoute:
        return self._routes.get(model, self._default)


# -- strategy ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A deployment as a strategy sees it. `ttft_s`: EWMA of time to first token, None before
    the first sample."""

    weight: float
    inflight: int = 0
    ttft_s: float | None = None


def choose(strategy: Strategy, candidates: Sequence[Candidate], rng: random.Random) -> int:
    """The index of the chosen candidate (`candidates` must not be empty). Ties of the
    least-in-flight and lowest-latency strategies are broken by weight."""
    if not candidates:
        raise ValueError("no candidates")
    indexes = list(range(len(candidates)))
    if strategy is Strategy.LEAST_INFLIGHT:
        low = min(c.inflight for c in candidates)
        indexes = [i for i in indexes if candidates[i].inflight == low]
    elif strategy is Strategy.LOWEST_LATENCY:
        unsampled = [i for i in indexes if candidates[i].ttft_s is None]
        if unsampled:  # measure every deployment once before comparing
            indexes = unsampled
        else:
            fastest = min(c.ttft_s for c in candidates if c.ttft_s is not None)
            indexes = [i for i in indexes if candidates[i].ttft_s == fastest]
    return _weighted(indexes, candidates, rng)


def _weighted(indexes: list[int], candidates: Sequence[Candidate], rng: random.Random) -> int:
    if len(indexes) == 1:
        return indexes[0]
    total = sum(candidates[i].weight for i in indexes)
    point = rng.random() * total
    for i in indexes:
        point -= candidates[i].weight
        if point < 0:
            return i
    return indexes[-1]


def ewma(previous: float | None, sample: float, alpha: float = 0.3) -> float:
    return sample if previous is None else alpha * sample + (1 - alpha) * previous


# -- retries -------------------------------------------------------------------------------------


def retry_delay_s(retry_number: int, policy: RetryPolicy, rng: random.Random, retry_after_s: float | None = None) -> float:
    """The wait before retry number `retry_number` (1 for the first retry): full jitter,
    uniform in [0, min(max, base * 2**(n-1))], and never less than `retry_after_s`."""
    cap = min(policy.backoff_max_s, policy.backoff_base_s * (2 ** max(0, retry_number - 1)))
    delay = rng.uniform(0.0, cap)
    return max(delay, retry_after_s or 0.0)


class RetryBudget:
    """Two limits on retries (every attempt after a request's first), so a storm of failures
    is not amplified:

    - in flight: retries waiting or running at most max(min_concurrent, percent% of active
      requests) (Envoy's `retry_budget`); a retry holds its slot from `try_acquire()` (before
      its backoff) to `release()` (its first token or its end);
    - over time: retries granted in the last `window_s` at most max(min_concurrent, percent% of
      the requests started in it) (Finagle's `RetryBudget`), so upstream attempts stay within
      (1 + percent%) of client requests however fast attempts fail.

    The window is short (1 s) so a quiet server still gets `min_concurrent` retries a second;
    the bound on the ratio therefore holds for storms above min_concurrent / percent% requests
    a second. Times are monotonic seconds from the caller; counts are kept in ten buckets."""

    def __init__(self, policy: BudgetPolicy, window_s: float = 1.0) -> None:
        self.policy = policy
        self.window_s = window_s
        self.active = 0
        self.retrying = 0
        self.granted = 0
        self.denied = 0
        self._buckets: deque[list[int]] = deque()  # [bucket number, requests, retries]

    def _bucket(self, now_s: float) -> list[int]:
        step = self.window_s / 10
        second = int(now_s / step)
        buckets = self._buckets
        while buckets and buckets[0][0] <= second - 10:
            buckets.popleft()
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        return buckets[-1]

    def start_request(self, now_s: float) -> None:
        self.active += 1
        self._bucket(now_s)[1] += 1

    def end_request(self) -> None:
        self.active -= 1

    def limit(self) -> int:
        return max(self.policy.min_concurrent, int(self.active * self.policy.percent / 100))

    def try_acquire(self, now_s: float) -> bool:
        bucket = self._bucket(now_s)
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        allowed = max(self.policy.min_concurrent, int(requests * self.policy.percent / 100))
        if self.retrying >= self.limit() or retries >= allowed:
            self.denied += 1
            return False
        bucket[2] += 1
        self.retrying += 1
        self.granted += 1
        return True

    def release(self) -> None:
        self.retrying -= 1


# -- continuation --------------------------------------------------------------------------------


class OverlapStripper:
    """Removes from the start of a continuation the text that repeats the end of `prefix`.

    Holds the continuation's text while it could still be a repeat (it occurs inside the last
    `window` characters of the prefix), then drops the longest suffix of the prefix (at least
    `min_overlap` characters) that the held text starts with."""

    def __init__(self, prefix: str, window: int = 400, min_overlap: int = 3) -> None:
        self._tail = prefix[-window:]
        self._min = min_overlap
        self._held = ""
        self._resolved = not self._tail

    def feed(self, text: str) -> str:
        """The text to emit now (maybe empty)."""
        if self._resolved:
            return text
        self._held += text
        tail, held = self._tail, self._held
        if len(held) < len(tail) and tail.find(held, 0, len(tail) - 1) != -1:
            return ""  # could still be a repeat: wait for more
        return self.flush()

    def flush(self) -> str:
        """The held text minus its overlap; the stripper passes everything through afterwards."""
        if self._resolved:
            return ""
        self._resolved = True
        held, self._held = self._held, ""
        for k in range(min(len(self._tail), len(held)), self._min - 1, -1):
            if held.startswith(self._tail[-k:]):
                return held[k:]
        return held


CONTINUE_PROMPT = "Continue your previous answer exactly where it stops, without repeating any of it."


def continuation_request(request: ChatRequest, partial: str) -> ChatRequest:
    """`request` with the partial answer as an assistant message and a request to continue."""
    messages = (*request.messages, ChatMessage("assistant", partial), ChatMessage("user", CONTINUE_PROMPT))
    return replace(request, messages=messages)
