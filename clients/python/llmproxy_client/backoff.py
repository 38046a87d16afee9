"""Reconnect delays shared by both clients."""

from __future__ import annotations

import random


class Backoff:
    """Delays for reconnect attempts: base x factor^n, +/- jitter, capped (defaults: 1 s x 1.6,
    +/-20 %, at most 15 s)."""

    def __init__(self, base_s: float = 1.0, factor: float = 1.6, jitter: float = 0.2, cap_s: float = 15.0) -> None:
        self.base_s, self.factor, self.jitter, self.cap_s = base_s, factor, jitter, cap_s

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        raw = min(self.cap_s, self.base_s * self.factor**attempt)
        return raw * (1 + rng.uniform(-self.jitter, self.jitter))
