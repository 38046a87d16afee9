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
  `min_concurrent` (Envoy's `retry_budget`), and a token bucket that lets retries be at most
  `percent` of requests (Finagle's), so a 429 storm is not amplified.
- `OverlapStripper`: the start of a continuation minus what repeats the partial answer.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from server.catalog import Catalog
from server.core.request import CONTINUE_PROMPT, ChatMessage, ChatRequest
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
    began, or after the failure that triggers a continuation (each gets its own)."""

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
    - over time, a token bucket (Finagle's `RetryBudget`): each request deposits percent/100 of
      a token, each retry withdraws a whole one, and a deposit not spent within `window_s`
      expires. A withdrawal is for good (it does not age out of a window and free its place
      again, which is how a sliding count let storms reach 1.21-1.24x), so upstream attempts stay
      within (1 + percent%) of client requests. A quiet server, whose deposits do not add up to
      a token, still gets `min_concurrent` retries per `window_s`: such a retry borrows the
      missing part, and the next deposits repay it before they can be spent. A debt not repaid
      within `window_s` is forgiven, so the bound holds for storms above
      min_concurrent / percent% requests per window (15 a second by default).

    Times are monotonic seconds from the caller."""

    _EPSILON = 1e-9

    def __init__(self, policy: BudgetPolicy, window_s: float = 1.0) -> None:
        self.policy = policy
        self.window_s = window_s
        self.active = 0
        self.retrying = 0
        self.granted = 0
        self.denied = 0
        self._share = policy.percent / 100
        self._deposits: deque[list[float]] = deque()  # [expires_at, amount left], oldest first
        self._balance = 0.0  # sum of the deposits' amounts
        self._debts: deque[list[float]] = deque()  # [expires_at, amount owed], oldest first
        self._recent: deque[float] = deque()  # times of the retries granted in the window

    def _expire(self, now_s: float) -> None:
        deposits, debts, recent = self._deposits, self._debts, self._recent
        while deposits and deposits[0][0] <= now_s:
            self._balance -= deposits.popleft()[1]
        while debts and debts[0][0] <= now_s:
            debts.popleft()
        while recent and recent[0] <= now_s - self.window_s:
            recent.popleft()

    def start_request(self, now_s: float) -> None:
        self.active += 1
        self._expire(now_s)
        amount = self._share
        debts = self._debts
        while debts and amount > 0:  # repay what quiet-time retries borrowed first
            paid = min(debts[0][1], amount)
            debts[0][1] -= paid
            amount -= paid
            if debts[0][1] <= self._EPSILON:
                debts.popleft()
        if amount > self._EPSILON:
            self._deposits.append([now_s + self.window_s, amount])
            self._balance += amount

    def end_request(self) -> None:
        self.active -= 1

    def limit(self) -> int:
        return max(self.policy.min_concurrent, int(self.active * self.policy.percent / 100))

    def try_acquire(self, now_s: float) -> bool:
        self._expire(now_s)
        if self.retrying >= self.limit():
            self.denied += 1
            return False
        if self._balance >= 1 - self._EPSILON:
            self._withdraw(1.0)
        elif len(self._recent) < self.policy.min_concurrent:
            owed = 1.0 - self._balance
            self._withdraw(self._balance)
            self._debts.append([now_s + self.window_s, owed])
        else:
            self.denied += 1
            return False
        self._recent.append(now_s)
        self.retrying += 1
        self.granted += 1
        return True

    def _withdraw(self, amount: float) -> None:
        deposits = self._deposits
        self._balance -= amount
        while deposits and amount > self._EPSILON:
            taken = min(deposits[0][1], amount)
            deposits[0][1] -= taken
            amount -= taken
            if deposits[0][1] <= self._EPSILON:
                deposits.popleft()
        if not deposits:
            self._balance = 0.0

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


def continuation_request(request: ChatRequest, partial: str) -> ChatRequest:
    """`request` with the partial answer as an assistant message and a request to continue."""
    messages = (*request.messages, ChatMessage("assistant", partial), ChatMessage("user", CONTINUE_PROMPT))
    return replace(request, messages=messages)
