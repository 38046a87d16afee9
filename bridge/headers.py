"""Request header helpers shared by the bridge's WebSocket and HTTP fronts."""

from __future__ import annotations

from collections.abc import Sequence


def one_header(values: Sequence[str], limit: int = 128) -> str:
    """The value of a header given exactly once (bounded), else "": for pass-through values such
    as `traceparent`, which the server parses and ignores when malformed."""
    return values[0][:limit] if len(values) == 1 else ""
