"""What every HTTP provider adapter is made of, and the pure helpers they share.

An adapter is three pure functions of one provider's wire format (TensorZero-style stream
mapping; Portkey-style one module per provider):

    build_request(request, endpoint) -> UpstreamRequest    the upstream call, never sent here
    new_decoder()                    -> StreamDecoder      feed(SSEEvent) -> [ProviderEvent]
    classify_error(status, headers, body) -> UpstreamError by status and structured error type

The shared driver (`server.providers.http.HttpBackend`) does all the I/O. Nothing in an adapter
reads a client-supplied URL, key or header: the `Endpoint` comes from the server's config only
(the LiteLLM `api_base` SSRF, CVE-2024-6587, is the lesson).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import orjson

from server.core.events import ProviderEvent
from server.core.request import ChatRequest
from server.errors import InvalidRequest, MalformedStream, UpstreamError
from server.providers.sse import SSEEvent


class Secret:
    """A credential. Its repr and str are redacted so it cannot leak through logs, tracebacks,
    f-strings or dataclass reprs; only `reveal()` gives the value, at the one place that puts
    it in a request header."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines of one upstream call. `connect_s`: TCP+TLS; `first_token_s`: from sending the
    request to the first token (headers included); `stall_s`: the longest gap between two reads
    of the body once tokens flow."""

    connect_s: float = 10.0
    first_token_s: float = 120.0
    stall_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how one deployment calls its provider; built from the server's config only."""

    provider: str
    upstream_model: str
    base_url: str
    key: Secret | None = None
    headers: tuple[tuple[str, str], ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    api_version: str = ""  # Azure OpenAI `api-version`
    prompt_cache: bool = False  # mark the stable prefix for the provider's prompt cache (Anthropic)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One upstream call as an adapter builds it: an absolute URL (query included), header names
    in lowercase, the body. Plain data that the driver's transport puts on the wire (building an
    `httpx.Request` per call instead cost 50-80 us of URL parsing and header objects)."""

    method: str
    url: str
    headers: dict[str, str]
    content: bytes


class StreamDecoder(Protocol):
    """Turns the SSE events of one response into provider events."""

    def feed(self, event: SSEEvent) -> list[ProviderEvent]:
        """Decodes one SSE event. Raises the classified `UpstreamError` for an in-stream error
        event and `MalformedStream` for an event it cannot decode."""
        ...

    def end(self) -> list[ProviderEvent]:
        """The body ended. Returns the last events (ending with `Finished`) when the provider's
        own end of stream was seen; raises `StreamCut` otherwise."""
        ...


class Adapter(Protocol):
    """A provider's wire format; see the module docstring."""

    @property
    def name(self) -> str: ...

    @property
    def default_base_url(self) -> str: ...

    def build_request(self, request: ChatRequest, endpoint: Endpoint) -> UpstreamRequest:
        """Raises `InvalidRequest` for anything the provider cannot honour."""
        ...

    def new_decoder(self) -> StreamDecoder: ...

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError: ...


# -- helpers shared by the adapters --------------------------------------------------------------

# Things that look like credentials, removed from any provider text we keep (providers echo
# masked keys in 401 bodies; we keep none of it).
_KEYLIKE = re.compile(r"(sk-[A-Za-z0-9_\-*]{6,}|AIza[0-9A-Za-z_\-]{20,}|[A-Za-z0-9_\-]{32,})")
BODY_EXCERPT_CHARS = 500


def redact(text: str, *secrets: Secret | None) -> str:
    """`text` without the given secrets and without anything shaped like a key."""
    for secret in secrets:
        if secret is not None and secret.reveal():
            text = text.replace(secret.reveal(), "***")
    return _KEYLIKE.sub("***", text)


# Configured header values shorter than this are not treated as secrets (`1`, `true`): scrubbing
# them would mangle every number of a message. The key itself is scrubbed at any length.
MIN_HEADER_SECRET_CHARS = 8


@dataclass(frozen=True, slots=True)
class Scrubber:
    """Removes one deployment's configured secrets from provider texts, whatever their shape.

    `redact` catches what looks like a key; a provider that echoes our request (a 400 body
    quoting the Authorization header) can echo a key of any shape, so every text of an
    `UpstreamError` is also scrubbed of the configured key, its URL- and JSON-escaped forms,
    the request header values built from it (`Bearer <key>`) and the configured extra header
    values. Longest first, so a header value goes before the key inside it."""

    values: tuple[str, ...] = ()

    @classmethod
    def for_endpoint(cls, endpoint: Endpoint) -> Scrubber:
        found: set[str] = set()
        if endpoint.key is not None and endpoint.key.reveal():
            key = endpoint.key.reveal()
            found.update((key, quote(key, safe=""), orjson.dumps(key).decode()[1:-1]))
        found.update(v for _, v in endpoint.headers if len(v) >= MIN_HEADER_SECRET_CHARS)
        return cls(tuple(sorted(found, key=len, reverse=True)))

    def with_headers(self, headers: Mapping[str, str]) -> Scrubber:
        """Adds the request's header values that contain a secret (`Bearer <key>`)."""
        extra = {v for v in headers.values() if v not in self.values and any(s in v for s in self.values)}
        if not extra:
            return self
        return Scrubber(tuple(sorted({*self.values, *extra}, key=len, reverse=True)))

    def scrub(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, "***")
        return redact(text)

    def scrub_error(self, exc: UpstreamError) -> UpstreamError:
        """The same error with every text scrubbed (changed in place, returned for `raise`)."""
        exc.message = self.scrub(exc.message)
        exc.args = (exc.message,)
        exc.body = self.scrub(exc.body)
        exc.provider_type = self.scrub(exc.provider_type)
        return exc


def excerpt(body: bytes) -> str:
    """A short, redacted, printable excerpt of an error body."""
    return redact(body[: BODY_EXCERPT_CHARS * 2].decode("utf-8", "replace")[:BODY_EXCERPT_CHARS])


def parse_retry_after(headers: Mapping[str, str], now_s: float | None = None) -> float | None:
    """Seconds to wait, from `retry-after-ms` (OpenAI) or `retry-after` (RFC 9110 §10.2.3:
    delay-seconds or an HTTP-date). None when absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now_s is None else now_s))


def loads_event(event: SSEEvent, provider: str) -> Any:
    """The JSON payload of one SSE event; raises `MalformedStream` when it is not JSON."""
    try:
        return orjson.loads(event.data)
    except orjson.JSONDecodeError:
        raise MalformedStream(f"{provider} sent an event that is not JSON") from None


def loads_body(body: bytes) -> Any:
    """The JSON of an error body, or None."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def parse_json_arg(text: str, what: str) -> Any:
    """A JSON text from the client (tool schema, tool arguments); raises `InvalidRequest`."""
    try:
        return orjson.loads(text) if text else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest(f"{what} is not valid JSON") from None


def post_json(url: str, headers: dict[str, str], endpoint: Endpoint, body: Mapping[str, Any], params: Mapping[str, str] | None = None) -> UpstreamRequest:
    """A JSON POST to `url` (with `params` as its query). The endpoint's configured headers
    override the adapter's (names compared in lowercase)."""
    for name, value in endpoint.headers:
        headers[name.lower()] = value
    if params:
        url += "?" + urlencode(params)
    return UpstreamRequest("POST", url, headers, orjson.dumps(body))


def join_url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path
