"""Routing: turns a request into one stream of events from the deployment that serves it.

`Router.stream()` yields an `Attempt` event per upstream attempt, a `Routed` event naming the
deployment that answered, then that deployment's provider events. Failover, retries, circuit breakers and load distribution live here, behind this one
method, so the connection driver never knows how many upstream attempts a stream took.

- `policy`: configuration types and pure decisions (strategy, backoff, retry budget, overlap);
- `breaker`: the per-deployment circuit breaker, a table-driven state machine;
- `attempts`: the attempts of one request (which deployment next, retries, budget, continuation,
  usage, operator notes), a table-driven state machine;
- `router`: the async driver, its log lines and observers.
"""

from server.routing.breaker import Breaker, BreakerState
from server.routing.policy import (
    AfterFirstToken,
    BreakerPolicy,
    BudgetPolicy,
    ModelRoute,
    RetryPolicy,
    RoutingCatalog,
    Strategy,
)
from server.routing.router import DeploymentStatus, Router

__all__ = [
    "AfterFirstToken",
    "Breaker",
    "BreakerPolicy",
    "BreakerState",
    "BudgetPolicy",
    "DeploymentStatus",
    "ModelRoute",
    "RetryPolicy",
    "Router",
    "RoutingCatalog",
    "Strategy",
]
