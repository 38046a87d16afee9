"""One error hierarchy for the whole server, and the tables that translate it at boundaries.

    ProxyError                      code, message, retryable, retry_after_s
    ├── CallerError                 the client asked for something wrong or not allowed
    │   ├── InvalidRequest          missing / wrong-typed / out-of-range field, unhonourable param
    │   ├── UnknownModel
    │   ├── DuplicateStream
    │   ├── TooManyStreams
    │   ├── UnknownStream
    │   ├── SessionExpired          resume of an unknown / expired session, or a wrong token
    │   ├── TooManySessions
    │   ├── Unauthenticated         no, a malformed, an unknown or a revoked API key
    │   ├── ForbiddenModel          the key may not use this model
    │   ├── KeyRateLimited          the key's requests or tokens per minute (retry_after_s set)
    │   ├── QuotaExceeded           the key's token budget for the period is spent (retry_after_s)
    │   └── TooManyConnections      the key's concurrent connections
    ├── UpstreamError               the provider failed; keeps HTTP status and a redacted body
    │   ├── RateLimited             429 (retryable, retry_after_s from the headers)
    │   ├── Overloaded              503 / Anthropic 529 overloaded_error (retryable)
    │   ├── UpstreamUnauthenticated 401 / 403: our key was refused (not retryable)
    │   ├── UpstreamInvalidRequest  other 4xx (not retryable)
    │   ├── ContextLengthExceeded   the prompt does not fit (not retryable)
    │   ├── ContentFiltered         the provider's filter refused (not retryable)
    │   ├── UpstreamServerError     5xx (retryable)
    │   ├── StreamCut               the stream ended before its finish event (retryable)
    │   ├── MalformedStream         an event we cannot decode (retryable)
    │   │   └── EventTooLarge       an SSE line or event over the decoder's size caps
    │   └── UpstreamTimeout         connect / first token / stall deadline passed (retryable)
    └── InternalError               a bug of ours; the client sees INTERNAL and no details

Classification of upstream failures happens in each provider module, by HTTP status and the
provider's structured error type, never by message text. The message of every error is written
for the client: it never holds keys, headers or prompt text.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """The typed error codes; values are the WebSocket spelling, names match proto ErrorCode."""

    INVALID_REQUEST = "invalid_request"
    MALFORMED_FRAME = "malformed_frame"
    UNKNOWN_FRAME_TYPE = "unknown_frame_type"
    FRAME_TOO_LARGE = "frame_too_large"
    UNKNOWN_MODEL = "unknown_model"
    DUPLICATE_STREAM_ID = "duplicate_stream_id"
    TOO_MANY_STREAMS = "too_many_streams"
    UNKNOWN_STREAM = "unknown_stream"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    UPSTREAM_UNAUTHENTICATED = "upstream_unauthenticated"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    CONTENT_FILTERED = "content_filtered"
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN_MODEL = "forbidden_model"
    QUOTA_EXCEEDED = "quota_exceeded"
    EXPIRED = "expired"
    UNAVAILABLE = "unavailable"
    SLOW_READER = "slow_reader"
    RESUMED_ELSEWHERE = "resumed_elsewhere"


class ProxyError(Exception):
    """Base of every error the server reports to a client."""

    code: Code = Code.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


# -- caller errors -------------------------------------------------------------------------------


class CallerError(ProxyError):
    """The request itself is at fault; retrying it unchanged fails the same way."""

    code = Code.INVALID_REQUEST


class InvalidRequest(CallerError):
    code = Code.INVALID_REQUEST


class UnknownModel(CallerError):
    code = Code.UNKNOWN_MODEL


class DuplicateStream(CallerError):
    code = Code.DUPLICATE_STREAM_ID


class TooManyStreams(CallerError):
    code = Code.TOO_MANY_STREAMS
    retryable = True


class UnknownStream(CallerError):
    code = Code.UNKNOWN_STREAM


class SessionExpired(CallerError):
    """The session to resume is unknown, expired, or the token is wrong (one error for all
    three, so a resume attempt reveals nothing about other sessions)."""

    code = Code.EXPIRED


class StoreUnavailable(CallerError):
    """The shared store (Redis) does not answer: new streams wait until it does."""

    code = Code.UNAVAILABLE
    retryable = True


class TooManySessions(CallerError):
    code = Code.RATE_LIMITED
    retryable = True


class Unauthenticated(CallerError):
    """One error (and message) for a missing, malformed, unknown or revoked key, so a probe
    learns nothing about which keys exist."""

    code = Code.UNAUTHENTICATED


class ForbiddenModel(CallerError):
    code = Code.FORBIDDEN_MODEL


class KeyRateLimited(CallerError):
    """A per-key limit of the proxy (not the provider's 429, which is `RateLimited`)."""

    code = Code.RATE_LIMITED
    retryable = True


class QuotaExceeded(CallerError):
    code = Code.QUOTA_EXCEEDED
    retryable = True  # after retry_after_s, when the next budget period starts


class TooManyConnections(CallerError):
    code = Code.RATE_LIMITED
    retryable = True


# -- upstream errors -----------------------------------------------------------------------------


class UpstreamError(ProxyError):
    """The provider failed. `status` is the HTTP status (0 when there was no response) and
    `body` a short excerpt of the provider's error body with secrets removed."""

    code = Code.UPSTREAM_ERROR
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        provider_type: str = "",
        body: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.status = status
        self.provider_type = provider_type
        self.body = body


class RateLimited(UpstreamError):
    code = Code.RATE_LIMITED


class Overloaded(UpstreamError):
    code = Code.OVERLOADED


class UpstreamUnauthenticated(UpstreamError):
    code = Code.UPSTREAM_UNAUTHENTICATED
    retryable = False


class UpstreamInvalidRequest(UpstreamError):
    code = Code.INVALID_REQUEST
    retryable = False


class ContextLengthExceeded(UpstreamError):
    code = Code.CONTEXT_LENGTH_EXCEEDED
    retryable = False


class ContentFiltered(UpstreamError):
    code = Code.CONTENT_FILTERED
    retryable = False


class UpstreamServerError(UpstreamError):
    code = Code.UPSTREAM_ERROR


class StreamCut(UpstreamError):
    code = Code.UPSTREAM_ERROR


class MalformedStream(UpstreamError):
    code = Code.UPSTREAM_ERROR


class EventTooLarge(MalformedStream):
    """An SSE line or event over `SSEDecoder`'s caps: the upstream never ended it, or sent more
    than any provider's event holds; reading on would grow memory without bound."""


class UpstreamTimeout(UpstreamError):
    code = Code.TIMEOUT


# -- our own bugs --------------------------------------------------------------------------------


class InternalError(ProxyError):
    code = Code.INTERNAL

    def __init__(self, message: str = "internal error; see the server log") -> None:
        super().__init__(message)
