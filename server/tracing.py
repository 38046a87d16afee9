"""OpenTelemetry traces: a span per stream and one per upstream attempt, exported over OTLP/HTTP.

Off unless the server runs with `--otlp-endpoint URL` (e.g. http://127.0.0.1:4318/v1/traces);
then nothing here costs more than a dict entry per live stream.

Theory of operation. The W3C trace context (`traceparent: 00-<trace id>-<span id>-<flags>`) a
client sends as gRPC metadata on its `Stream` call is parsed once per call (`parse_traceparent`)
and kept on the session's runtime. When a stream's upstream work starts, `Tracer.begin_stream`
picks the stream span's id (a child of the client's span, or the root of a new trace); each
`Attempt` event from the router opens an attempt span under it (`begin_attempt`), and while that
attempt runs, `outgoing_traceparent` (a context variable, local to the stream's upstream task)
names it, so the provider driver sends `traceparent` on the upstream HTTP request and the
provider's own spans join the same trace. The stream span is finished from the stream's
`StreamRecord` (`end_streams`): start, duration and the gen_ai semantic-convention attributes
(operation, provider, request and response model, token usage, finish reason, time to first
token). Spans never carry prompt or answer text, keys or resume tokens: a `StreamRecord` has
none, and nothing else is read.

Finished spans are frozen `Span`s; `OtlpHttpExporter` batches them as OTLP/JSON and POSTs them
from a task of its own, so a slow collector never holds up a stream; a batch it cannot deliver
is dropped with a warning (traces are best effort, like every OTLP exporter's default).

The relay path (WebSocket clients through the bridge) has no field that carries a trace context
(`RelayOpen` has none), so those streams start traces of their own.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from server.core.session import StreamRecord

log = logging.getLogger("llmproxy.tracing")

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# OTLP span kinds and status codes (opentelemetry/proto/trace/v1/trace.proto).
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = 1, 2, 3
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
# Streams whose record never came (cannot happen today) are forgotten past this many.
MAX_OPEN_STREAMS = 100_000

AttributeValue = str | int | float | bool | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A W3C trace context: the trace, the parent span, whether the caller samples it."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero
    sampled: bool = True

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | bytes | None) -> TraceContext | None:
    """The context of a `traceparent` header, or None when it is absent or malformed (then the
    stream starts a trace of its own, as the W3C spec asks)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    m = _TRACEPARENT.match(text.strip().lower())
    if m is None or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
        return None
    return TraceContext(m.group(2), m.group(3), bool(int(m.group(4), 16) & 1))


def traceparent_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> TraceContext | None:
    """The context in gRPC metadata (`traceparent`), if any."""
    for key, value in metadata or ():
        if key.lower() == "traceparent":
            return parse_traceparent(value)
    return None


@dataclass(frozen=True, slots=True)
class Span:
    """One finished span, as exported."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: int
    start_ns: int  # Unix time
    end_ns: int
    attributes: tuple[tuple[str, AttributeValue], ...]
    status: int = STATUS_UNSET
    status_message: str = ""


@dataclass
class AttemptTrace:
    """An upstream attempt in progress."""

    context: TraceContext  # the attempt span's own id (what the provider request carries)
    parent_span_id: str
    provider: str
    upstream_model: str
    deployment: str
    start_ns: int
    open: bool = True


@dataclass
class StreamTrace:
    """A stream whose upstream work has started and whose record has not come yet."""

    context: TraceContext  # the stream span's own id
    parent_span_id: str
    start_ns: int
    upstream_model: str = ""
    attempts: list[AttemptTrace] = field(default_factory=list)


class SpanExporter(Protocol):
    def export(self, spans: Sequence[Span]) -> None: ...

    async def aclose(self) -> None: ...


# The attempt span of the running upstream request, in the stream's own upstream task only.
outgoing_traceparent: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("llmproxy_traceparent", default=None)


def inject_traceparent(headers: MutableMapping[str, str]) -> None:
    """Adds `traceparent` to an upstream request's headers while an attempt span is current."""
    context = outgoing_traceparent.get()
    if context is not None:
        headers["traceparent"] = context.traceparent()


class Tracer:
    """Builds the spans of streams and attempts and hands them to the exporter."""

    def __init__(self, exporter: SpanExporter, rng: random.Random | None = None, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._exporter = exporter
        self._rng = rng or random.Random()
        self._clock_ns = clock_ns
        self._streams: OrderedDict[tuple[str, str], StreamTrace] = OrderedDict()

    def _now(self) -> int:
        return self._clock_ns()

    def _new_id(self, hex_digits: int) -> str:
        return f"{self._rng.getrandbits(hex_digits * 4) or 1:0{hex_digits}x}"

    def begin_stream(self, session_id: str, stream_id: str, parent: TraceContext | None) -> StreamTrace:
        """The stream's trace, made at its first upstream start (a `modify` restart keeps it)."""
        key = (session_id, stream_id)
        trace = self._streams.get(key)
        if trace is None:
            trace_id = parent.trace_id if parent else self._new_id(32)
            sampled = parent.sampled if parent else True
            trace = StreamTrace(TraceContext(trace_id, self._new_id(16), sampled), parent.span_id if parent else "", self._now())
            self._streams[key] = trace
            while len(self._streams) > MAX_OPEN_STREAMS:
                self._streams.popitem(last=False)
        return trace

    def begin_attempt(self, stream: StreamTrace, provider: str, upstream_model: str, deployment: str) -> AttemptTrace:
        """Ends the stream's current attempt (a retry or failover replaces it, so it failed) and
        opens the next; makes it the `traceparent` of the upstream request that follows in this
        task."""
        self.end_attempt(stream, "attempt_failed")
        context = TraceContext(stream.context.trace_id, self._new_id(16), stream.context.sampled)
        attempt = AttemptTrace(context, stream.context.span_id, provider, upstream_model, deployment, self._now())
        stream.attempts.append(attempt)
        stream.upstream_model = upstream_model
        outgoing_traceparent.set(context)
        return attempt

    def end_attempt(self, stream: StreamTrace, error: str | None) -> None:
        """Finishes the stream's open attempt, if any (`error`: why it failed, else None)."""
        outgoing_traceparent.set(None)
        if not stream.attempts or not stream.attempts[-1].open:
            return
        a = stream.attempts[-1]
        a.open = False
        if not a.context.sampled:
            return
        attributes: list[tuple[str, AttributeValue]] = [
            ("gen_ai.operation.name", "chat"),
            ("gen_ai.system", a.provider),
            ("gen_ai.provider.name", a.provider),
            ("gen_ai.request.model", a.upstream_model),
            ("llmproxy.deployment", a.deployment),
        ]
        if error:
            attributes.append(("error.type", error))
        self._exporter.export(
            [
                Span(
                    a.context.trace_id, a.context.span_id, a.parent_span_id, f"chat {a.upstream_model}", KIND_CLIENT,
                    a.start_ns, self._now(), tuple(attributes), STATUS_ERROR if error else STATUS_UNSET, error or "",
                )
            ]
        )

    def end_streams(self, records: Iterable[StreamRecord]) -> None:
        """Finishes the span of each ended stream (streams never traced are skipped)."""
        spans = []
        for r in records:
            trace = self._streams.pop((r.session_id, r.stream_id), None)
            if trace is None or not trace.context.sampled:
                continue
            t = r.timing
            attributes: list[tuple[str, AttributeValue]] = [
                ("gen_ai.operation.name", "chat"),
                ("gen_ai.system", r.provider),
                ("gen_ai.provider.name", r.provider),
                ("gen_ai.request.model", r.model),
                ("gen_ai.response.model", trace.upstream_model),
                ("gen_ai.usage.input_tokens", r.prompt_tokens),
                ("gen_ai.usage.output_tokens", r.completion_tokens),
                ("llmproxy.stream_id", r.stream_id),
                ("llmproxy.deployment", r.deployment),
                ("llmproxy.attempts", t.attempts),
                ("llmproxy.tokens", t.tokens),
            ]
            if t.tokens:
                attributes.append(("gen_ai.server.time_to_first_token", t.ttft_us / 1e6))
            if r.failed:
                attributes.append(("error.type", r.status))
            else:
                attributes.append(("gen_ai.response.finish_reasons", (r.status,)))
            spans.append(
                Span(
                    trace.context.trace_id, trace.context.span_id, trace.parent_span_id, f"chat {r.model}", KIND_SERVER,
                    trace.start_ns, trace.start_ns + t.total_us * 1000, tuple(attributes),
                    STATUS_ERROR if r.failed else STATUS_UNSET, r.status if r.failed else "",
                )
            )
        if spans:
            self._exporter.export(spans)

    async def aclose(self) -> None:
        await self._exporter.aclose()


def otlp_json(spans: Sequence[Span], resource: Mapping[str, str]) -> dict[str, object]:
    """An OTLP ExportTraceServiceRequest in its JSON mapping (ids in hex, 64-bit ints as strings)."""

    def value(v: AttributeValue) -> dict[str, object]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        if isinstance(v, tuple):
            return {"arrayValue": {"values": [{"stringValue": s} for s in v]}}
        return {"stringValue": v}

    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": k, "value": {"stringValue": v}} for k, v in resource.items()]},
                "scopeSpans": [
                    {
                        "scope": {"name": "llmproxy"},
                        "spans": [
                            {
                                "traceId": s.trace_id,
                                "spanId": s.span_id,
                                **({"parentSpanId": s.parent_span_id} if s.parent_span_id else {}),
                                "name": s.name,
                                "kind": s.kind,
                                "startTimeUnixNano": str(s.start_ns),
                                "endTimeUnixNano": str(s.end_ns),
                                "attributes": [{"key": k, "value": value(v)} for k, v in s.attributes],
                                "status": {"code": s.status, **({"message": s.status_message} if s.status_message else {})},
                            }
                            for s in spans
                        ],
                    }
                ],
            }
        ]
    }


class OtlpHttpExporter:
    """Batches spans and POSTs them as OTLP/JSON to `endpoint` (the collector's /v1/traces)."""

    def __init__(self, endpoint: str, *, resource: Mapping[str, str] | None = None, flush_interval_s: float = 1.0, max_batch: int = 512, timeout_s: float = 5.0) -> None:
        self._endpoint = endpoint
        self._resource = dict(resource or {"service.name": "llmproxy"})
        self._flush_interval_s = flush_interval_s
        self._max_batch = max_batch
        self._timeout_s = timeout_s
        self._pending: list[Span] = []
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.exported = 0
        self.dropped = 0

    def export(self, spans: Sequence[Span]) -> None:
        self._pending.extend(spans)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self._pending) >= self._max_batch:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._flush_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self._send()

    async def _send(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=self._timeout_s)
            try:
                response = await self._client.post(self._endpoint, json=otlp_json(batch, self._resource))
                response.raise_for_status()
                self.exported += len(batch)
            except httpx.HTTPError as exc:
                self.dropped += len(batch)
                log.warning("OTLP export of %d spans to %s failed: %s", len(batch), self._endpoint, exc)

    async def aclose(self) -> None:
        """Sends what is pending, then stops."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._send()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
