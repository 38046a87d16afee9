"""What one stream recorded, and the summaries of many.

Times are `time.monotonic_ns()` of this process (and, for upstream send stamps, of the fake:
CLOCK_MONOTONIC is shared by every process on Linux). A frame that merges k tokens gives all k
the same receive time: their relay latencies differ (each token has its own send stamp), and
the inter-token gaps are taken between deliveries, so merging shows as longer gaps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One stream as a load client saw it."""

    sent_ns: int  # the request was written
    end_ns: int  # the stream's end (or failure) was read
    recv_ns: tuple[int, ...]  # receive time of every token, in order
    relay_ns: tuple[int, ...]  # receive time minus upstream send stamp, per token (empty: no stamps)
    ok: bool  # ended with the provider's / proxy's normal end of stream
    error: str = ""

    @property
    def tokens(self) -> int:
        return len(self.recv_ns)

    @property
    def ttft_ns(self) -> int | None:
        return self.recv_ns[0] - self.sent_ns if self.recv_ns else None

    def gaps_ns(self) -> list[int]:
        """Gaps between successive deliveries of tokens (a frame or a read that brought one or
        more): what a reader sees as the answer's rhythm. Per token, merged tokens would count
        as zero gaps, and a heavily merging path would look smoother than the direct one."""
        r = sorted(set(self.recv_ns))
        return [r[i] - r[i - 1] for i in range(1, len(r))]

    @property
    def per_token_ns(self) -> float | None:
        """Mean time per token after the first: this stream's pace as received."""
        if len(self.recv_ns) < 2:
            return None
        return (self.recv_ns[-1] - self.recv_ns[0]) / (len(self.recv_ns) - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def ms(ns: float) -> float:
    return round(ns / 1e6, 4)


@dataclass(frozen=True, slots=True)
class PathSummary:
    """One path of one workload, all rounds pooled."""

    streams: int
    failed: int
    tokens: int
    wall_s: float  # summed over rounds: first request sent -> last stream ended
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    relay_p50_ms: float  # NaN without upstream stamps
    relay_p99_ms: float
    per_token_ms: float  # median over streams of each stream's mean time per token
    server_cpu_s: float
    bridge_cpu_s: float
    proxy_cpu_us_per_token: float  # (server + bridge CPU) / tokens
    fake_cpu_s: float  # the harness: fake upstream ...
    client_cpu_s: float  # ... and load client, to see when the harness itself is the limit
    harness_cpu_us_per_token: float
    errors: tuple[str, ...]

    @staticmethod
    def of(
        records: Sequence[StreamRecord], wall_s: float, server_cpu_s: float, bridge_cpu_s: float, fake_cpu_s: float, client_cpu_s: float
    ) -> PathSummary:
        ttft = [t for r in records if (t := r.ttft_ns) is not None]
        gaps = [g for r in records for g in r.gaps_ns()]
        relay = [x for r in records for x in r.relay_ns]
        per_token = [p for r in records if (p := r.per_token_ns) is not None]
        tokens = sum(r.tokens for r in records)
        errors = sorted({r.error for r in records if r.error})
        return PathSummary(
            streams=len(records),
            failed=sum(not r.ok for r in records),
            tokens=tokens,
            wall_s=round(wall_s, 4),
            tokens_per_s=round(tokens / wall_s, 1) if wall_s > 0 else math.nan,
            ttft_p50_ms=ms(percentile(ttft, 50)),
            ttft_p99_ms=ms(percentile(ttft, 99)),
            itl_p50_ms=ms(percentile(gaps, 50)),
            itl_p99_ms=ms(percentile(gaps, 99)),
            relay_p50_ms=ms(percentile(relay, 50)),
            relay_p99_ms=ms(percentile(relay, 99)),
            per_token_ms=ms(percentile(per_token, 50)),
            server_cpu_s=round(server_cpu_s, 3),
            bridge_cpu_s=round(bridge_cpu_s, 3),
            proxy_cpu_us_per_token=round((server_cpu_s + bridge_cpu_s) / tokens * 1e6, 2) if tokens else math.nan,
            fake_cpu_s=round(fake_cpu_s, 3),
            client_cpu_s=round(client_cpu_s, 3),
            harness_cpu_us_per_token=round((fake_cpu_s + client_cpu_s) / tokens * 1e6, 2) if tokens else math.nan,
            errors=tuple(errors[:5]),
        )


@dataclass(frozen=True, slots=True)
class Comparison:
    """A proxy path against the reference path of the same workload, same run."""

    against: str
    added_ttft_p50_ms: float
    added_ttft_p99_ms: float
    added_relay_p50_ms: float
    added_relay_p99_ms: float
    added_per_token_ms: float
    itl_p99_ratio: float
    tokens_per_s_ratio: float

    @staticmethod
    def of(path: PathSummary, ref: PathSummary, against: str) -> Comparison:
        def ratio(a: float, b: float) -> float:
            return round(a / b, 3) if b and not math.isnan(b) else math.nan

        return Comparison(
            against=against,
            added_ttft_p50_ms=round(path.ttft_p50_ms - ref.ttft_p50_ms, 4),
            added_ttft_p99_ms=round(path.ttft_p99_ms - ref.ttft_p99_ms, 4),
            added_relay_p50_ms=round(path.relay_p50_ms - ref.relay_p50_ms, 4),
            added_relay_p99_ms=round(path.relay_p99_ms - ref.relay_p99_ms, 4),
            added_per_token_ms=round(path.per_token_ms - ref.per_token_ms, 4),
            itl_p99_ratio=ratio(path.itl_p99_ms, ref.itl_p99_ms),
            tokens_per_s_ratio=ratio(path.tokens_per_s, ref.tokens_per_s),
        )
