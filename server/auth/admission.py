"""Admission of every provider request of a key: a stream's start, each `modify` (a new
generation) and each continuation the router makes after a cut (a new upstream call).

The servicer calls an `Admission` with the client frame that asks for the request (for a
continuation, `continuation(stream_id)` stands for it); it answers None, or the typed error to
refuse it with. A refused start or modify is answered with an error of `seq` 0 and changes no
stream; a refused continuation ends its stream with the error. Tokens of every attempt are
charged separately, as generations end or are abandoned (server/service.py `_charged`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from llmproxy.v1 import llmproxy_pb2 as pb
from server.auth.policy import AuthPolicy, Principal
from server.core.session import Session
from server.errors import ProxyError

ADMITTED = frozenset({"start", "modify"})  # the client frames that make a provider request


class _HasSession(Protocol):
    session: Session


def continuation(stream_id: str) -> pb.ClientFrame:
    """The frame that stands for a continuation of `stream_id` at admission."""
    return pb.ClientFrame(modify=pb.Modify(stream_id=stream_id))


def stream_id_of(frame: pb.ClientFrame) -> str:
    return frame.start.stream_id if frame.WhichOneof("kind") == "start" else frame.modify.stream_id


class Admission:
    """The per-request check of one key on one session: revocation, models, rates, budget and
    live streams (over all the key's sessions)."""

    def __init__(self, auth: AuthPolicy, principal: Principal, session: Session, runtimes: Mapping[str, _HasSession]) -> None:
        self._auth = auth
        self._principal = principal
        self._session = session
        self._runtimes = runtimes

    def __call__(self, frame: pb.ClientFrame) -> ProxyError | None:
        principal = self._principal
        if frame.WhichOneof("kind") == "start":
            model, own = frame.start.model, 0
        else:
            found = self._session.model_of(frame.modify.stream_id)
            if found is None:
                return None  # not a live stream: the session answers unknown_stream, no request
            model, own = found, 1  # the stream already counts among the live ones
        live = 0
        if principal.limits.concurrency:
            live = _live(self._runtimes.values(), principal.key_id) - own
        return self._auth.admit(principal, model, live)


def _live(runtimes: Iterable[_HasSession], key_id: str) -> int:
    return sum(r.session.live_streams for r in runtimes if r.session.owner == key_id)
