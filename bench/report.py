"""The bench's results as JSON and as markdown tables, and the relay's targets (issue 13)
checked against them (reported, never asserted: speed lives here, not in tests)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.idle import IdleResult
from bench.measure import WorkloadResult

CHAIN = "ws"  # the targets are about the full chain: WebSocket -> bridge -> server -> upstream


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    limit: str
    measured: float | None  # None: not measured in this run
    met: bool | None


def _get(results: dict[str, WorkloadResult], key: str, pick: Callable[[WorkloadResult], float]) -> float | None:
    result = results.get(key)
    if result is None or CHAIN not in result.paths:
        return None
    value = pick(result)
    return None if math.isnan(value) else value


def knee(results: dict[str, WorkloadResult]) -> float | None:
    """The most streams among the (iii) workloads measured whose added relay p99 (chain against
    direct, same run) stays within 10 ms; None when none was measured."""
    best: float | None = None
    for key, result in results.items():
        if key.startswith("iii_") and CHAIN in result.comparisons:
            if best is None:
                best = 0.0
            if result.comparisons[CHAIN].added_relay_p99_ms <= 10:
                best = max(best, float(result.workload.streams))
    return best


def targets(results: dict[str, WorkloadResult], idle: IdleResult | None) -> list[Target]:
    def t(name: str, limit: str, value: float | None, ok: Callable[[float], bool]) -> Target:
        return Target(name, limit, value, None if value is None else ok(value))

    chain = lambda key, pick: _get(results, key, lambda r: pick(r.paths[CHAIN]))  # noqa: E731
    versus = lambda key, pick: _get(results, key, lambda r: pick(r.comparisons[CHAIN]))  # noqa: E731
    out = [
        t("proxy CPU us/token, (iii) 50 streams", "<= 70", chain("iii_50", lambda p: p.proxy_cpu_us_per_token), lambda v: v <= 70),
        t("added relay p50 ms, (iii) 50 streams", "<= 1", versus("iii_50", lambda c: c.added_relay_p50_ms), lambda v: v <= 1),
        t("added relay p99 ms, (iii) 50 streams", "<= 10", versus("iii_50", lambda c: c.added_relay_p99_ms), lambda v: v <= 10),
        t("TTFT p99 ms, (iii) 50 streams", "<= 20", chain("iii_50", lambda p: p.ttft_p99_ms), lambda v: v <= 20),
        t("inter-token p99 vs direct, (iii) 200 streams", "<= 1.5x", versus("iii_200", lambda c: c.itl_p99_ratio), lambda v: v <= 1.5),
        t("TTFT p99 ms, (iii) 200 streams", "<= 60", chain("iii_200", lambda p: p.ttft_p99_ms), lambda v: v <= 60),
        t("tokens/s vs direct, (vi) 200 arriving", ">= 0.95x", versus("vi", lambda c: c.tokens_per_s_ratio), lambda v: v >= 0.95),
        t("TTFT p99 ms from connect, (vi) 200 arriving", "<= 100", chain("vi", lambda p: p.ttft_p99_ms), lambda v: v <= 100),
        t("added relay p99 ms, (vi) 200 arriving", "<= 20", versus("vi", lambda c: c.added_relay_p99_ms), lambda v: v <= 20),
        t("knee: most (iii) streams with added relay p99 <= 10 ms", ">= 150", knee(results), lambda v: v >= 150),
        t("tokens/s, (iv)", ">= 60000", chain("iv", lambda p: p.tokens_per_s), lambda v: v >= 60_000),
        t("added TTFT p50 ms, (i)", "<= 1.5", versus("i", lambda c: c.added_ttft_p50_ms), lambda v: v <= 1.5),
    ]  # fmt: skip
    if idle is not None:
        out.append(t("KB per idle session (bridge + server)", "<= 32", idle.kb_per_session, lambda v: v <= 32))
        out.append(t(f"idle sessions dropped of {idle.sessions}", "0 (of 10,000)", float(idle.dropped), lambda v: v == 0))
    return out


def _clean(value: Any) -> Any:
    """NaN (nothing to measure) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json(meta: dict[str, Any], results: dict[str, WorkloadResult], idle: IdleResult | None) -> dict[str, Any]:
    workloads = {}
    for key, r in results.items():
        w = r.workload
        workloads[key] = {
            "title": w.title,
            "source": w.source,
            "streams": w.streams,
            "tokens_per_stream": w.tokens,
            "pace_ms": w.pace_ms,
            "rounds": w.rounds,
            "reference": r.reference,
            "skipped": r.skipped,
            "paths": {name: asdict(s) for name, s in r.paths.items()},
            "comparisons": {name: asdict(c) for name, c in r.comparisons.items()},
        }
    cleaned: dict[str, Any] = _clean(
        {
            "meta": meta,
            "workloads": workloads,
            "idle": asdict(idle) if idle is not None else None,
            "targets": [asdict(t) for t in targets(results, idle)],
        }
    )
    return cleaned


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def to_markdown(meta: dict[str, Any], results: dict[str, WorkloadResult], idle: IdleResult | None) -> str:
    lines = [
        f"# llmproxy bench ({'smoke' if meta.get('smoke') else 'full'}), {meta.get('started_at', '')}",
        "",
        f"{meta.get('machine', '')}; pinning: {meta.get('pinning', '')}. Paths: `direct` = the load client reads the fake OpenAI upstream itself; "
        "`ws` = WebSocket -> bridge -> gRPC -> server (-> upstream); `grpc` = gRPC straight to the server. "
        "All in one run, rounds interleaved. Times in ms; relay = client receive time - upstream send stamp; "
        "ITL = gaps between deliveries of tokens (merged tokens arrive together: one gap); ms/token = median over streams of each stream's mean time per token; CPU = utime+stime per token of server + bridge "
        "(proxy) and of fake upstream + load client (harness: when its CPU saturates, the harness is the limit).",
        "",
        *([f"Upstream transports compared, one chain each (`ws-<transport>`): {meta['transports']}.", ""] if meta.get("transports") else []),
        *([f"Processes: {meta['processes']}.", ""] if meta.get("processes") else []),
        "## Streams",
        "",
        "| workload | path | streams x tokens x rounds | failed | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | relay p50 | relay p99 | ms/token | proxy CPU us/token (server + bridge) | harness CPU us/token |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in results.items():
        w = r.workload
        for name, s in r.paths.items():
            cpu = "-" if name == "direct" else f"{_f(s.proxy_cpu_us_per_token, 1)} ({_f(s.server_cpu_s / max(1, s.tokens) * 1e6, 1)} + {_f(s.bridge_cpu_s / max(1, s.tokens) * 1e6, 1)})"
            lines.append(
                f"| {key} {w.title} | {name} | {w.streams} x {w.tokens} x {w.rounds} | {s.failed} | {_f(s.tokens_per_s, 0)} | "
                f"{_f(s.ttft_p50_ms, 3)} | {_f(s.ttft_p99_ms, 3)} | {_f(s.itl_p50_ms, 3)} | {_f(s.itl_p99_ms, 3)} | "
                f"{_f(s.relay_p50_ms, 3)} | {_f(s.relay_p99_ms, 3)} | {_f(s.per_token_ms, 4)} | {cpu} | {_f(s.harness_cpu_us_per_token, 1)} |"
            )
        if r.skipped:
            lines.append(f"| {key} {w.title} | ws, grpc | skipped: {r.skipped} | | | | | | | | | | | |")
    lines += [
        "",
        "## Added by the proxy (against the reference path, same run)",
        "",
        "| workload | path | vs | +TTFT p50 | +TTFT p99 | +relay p50 | +relay p99 | +ms/token | ITL p99 ratio | tokens/s ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in results.items():
        for name, c in r.comparisons.items():
            lines.append(
                f"| {key} | {name} | {c.against} | {_f(c.added_ttft_p50_ms, 3)} | {_f(c.added_ttft_p99_ms, 3)} | "
                f"{_f(c.added_relay_p50_ms, 3)} | {_f(c.added_relay_p99_ms, 3)} | {_f(c.added_per_token_ms, 4)} | "
                f"{_f(c.itl_p99_ratio, 2)} | {_f(c.tokens_per_s_ratio, 2)} |"
            )
    if idle is not None:
        lines += [
            "",
            "## (v) Idle WebSocket sessions",
            "",
            "| sessions | opened | held (pong after hold) | dropped | connect s | hold s | WS ping every s | bridge KB/session | server KB/session | total KB/session |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {idle.sessions:,} | {idle.opened:,} | {idle.held:,} | {idle.dropped:,} | {idle.connect_s} | {idle.hold_s} | "
            f"{idle.ping_interval_s} | {_f(idle.bridge_kb_per_session, 1)} | {_f(idle.server_kb_per_session, 1)} | {_f(idle.kb_per_session, 1)} |",
        ]
    lines += ["", "## Targets of the relay issue (chain = ws path)", "", "| target | limit | measured | met |", "|---|---|---:|---|"]
    for t in targets(results, idle):
        met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.name} | {t.limit} | {_f(t.measured, 3)} | {met} |")
    return "\n".join(lines) + "\n"
