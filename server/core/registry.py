"""Sessions by id: creation, resume, detach and expiry. Sans-I/O.

A connection gets a fresh session when it opens. A `resume` as its first frame swaps that fresh
session for the earlier one, if the id is known and the token matches (compared in constant
time) and the session belongs to the same API key; otherwise the connection keeps its fresh
session and gets one EXPIRED error that does not say which of the checks failed. A resume that
names a stream twice, more streams than a session keeps, or an over-long stream id is refused
(`invalid_request`) before any lookup: each named stream costs a replay. A detached
session lives `resume_grace_s`; then it is closed (its streams cancelled) and forgotten. When the session count reaches its limit, the
session detached the longest is evicted first; if every session is attached, creation fails.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Container, Iterator

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.session import Session
from server.core.session_limits import SessionLimits
from server.errors import InvalidRequest, SessionExpired, TooManySessions

EXPIRED_MESSAGE = "no such session, or it has expired"


class SessionRegistry:
    def __init__(
        self,
        limits: SessionLimits,
        known_models: Container[str],
        wall_time_ns: Callable[[], int],
        new_secret: Callable[[int], str],
        resume_grace_s: float = 30.0,
        max_sessions: int = 100_000,
    ) -> None:
        self._limits = limits
        self._known_models = known_models
        self._wall_time_ns = wall_time_ns
        self._new_secret = new_secret  # bytes of entropy -> URL-safe text
        self._grace_ns = int(resume_grace_s * 1e9)
        self._max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._forgotten: list[Session] = []  # closed here; their actions are not yet applied

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def create(self, now_ns: int, owner: str = "", api: str = "") -> Session:
        """A fresh, attached session of `owner` (an API key id, "" without auth). Raises
        `TooManySessions` when none can be evicted."""
        self._make_room(now_ns)
        session = Session(
            self._new_secret(12),
            self._new_secret(32),
            self._limits,
            self._known_models,
            self._wall_time_ns,
            now_ns,
            resume_grace_ms=self._grace_ns // 1_000_000,
            owner=owner,
            api=api,
        )
        self._sessions[session.id] = session
        return session

    def _make_room(self, now_ns: int) -> None:
        if len(self._sessions) >= self._max_sessions:
            detached = [s for s in self._sessions.values() if not s.attached]
            if not detached:
                raise TooManySessions(f"the server holds its maximum of {self._max_sessions} sessions")
            oldest = min(detached, key=lambda s: s.detached_ns)
            self._forget(oldest, now_ns)

    def get(self, session_id: str, token: str) -> Session | None:
        """The session if the token matches, else None (constant-time comparison)."""
        session = self._sessions.get(session_id)
        # Compare against a same-length dummy when the id is unknown, so timing says nothing.
        expected = session.token if session is not None else "x" * len(token)
        if not hmac.compare_digest(expected.encode(), token.encode()) or session is None or session.closed:
            return None
        return session

    def by_id(self, session_id: str) -> Session | None:
        """The session by id alone: for a resume whose token the shared store has checked."""
        return self._sessions.get(session_id)

    def add(self, session: Session, now_ns: int) -> None:
        """A session that another server began (read from the shared store): held here like one
        created here, evicting as `create` does. Raises `TooManySessions`."""
        self._make_room(now_ns)
        self._sessions[session.id] = session

    def drop(self, session: Session) -> None:
        """Forgets a session without closing it: it lives on another server now."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def check_resume(self, current: Session, resume: pb.Resume) -> bool:
        """The checks of `resume` made before any lookup; False: `current` has the error queued."""
        if not current.is_fresh():
            current.reject("", InvalidRequest("resume must come before any stream on a connection"))
            return False
        refused = _check_streams(resume, current.resume_limit(), self._limits.max_stream_id_chars)
        if refused is not None:
            current.reject("", refused)
            return False
        return True

    def swap(self, current: Session, target: Session, resume: pb.Resume, now_ns: int) -> None:
        """The connection leaves its fresh session for `target`, which replays what it missed."""
        self._sessions.pop(current.id, None)
        target.resume(resume, now_ns)

    def expiry_candidates(self, now_ns: int) -> list[Session]:
        """Sessions detached longer than the grace period (a shared store decides their fate)."""
        return [s for s in self._sessions.values() if not s.attached and now_ns - s.detached_ns >= self._grace_ns]

    def resume(self, current: Session, resume: pb.Resume, now_ns: int) -> Session:
        """The session the connection holds after `resume`: the resumed one, or `current` (which
        then has an error frame queued)."""
        if not self.check_resume(current, resume):
            return current
        target = self.get(resume.session_id, resume.resume_token)
        # Another key's session is refused exactly like an unknown one (same error, same text).
        if target is None or target is current or target.owner != current.owner:
            current.reject("", SessionExpired(EXPIRED_MESSAGE))
            return current
        del self._sessions[current.id]
        target.resume(resume, now_ns)
        return target

    def detach(self, session: Session, now_ns: int) -> None:
        """The session's connection ended. A closed session is forgotten at once."""
        session.detach(now_ns)
        if session.is_fresh() or (session.closed and session.live_streams == 0):
            self._sessions.pop(session.id, None)  # nothing to resume

    def expire(self, now_ns: int, spare: Container[str] = ()) -> list[Session]:
        """Closes and forgets the sessions detached longer than the grace period (but those in
        `spare`, which the shared store says live on); returns them with any evicted since the
        last call. The caller applies their actions (which cancel their upstream requests)."""
        for session in self.expiry_candidates(now_ns):
            if session.id not in spare:
                self._forget(session, now_ns)
        forgotten, self._forgotten = self._forgotten, []
        return forgotten

    def _forget(self, session: Session, now_ns: int) -> None:
        session.close(now_ns)
        del self._sessions[session.id]
        self._forgotten.append(session)


def _check_streams(resume: pb.Resume, limit: int, max_id_chars: int) -> InvalidRequest | None:
    """The resume's stream list is refused when it is longer than `limit`, repeats an id or
    holds an over-long one; the check stops at the first fault (it costs at most `limit`)."""
    if len(resume.streams) > limit:
        return InvalidRequest(f"a resume may name at most {limit} streams")
    seen: set[str] = set()
    for position in resume.streams:
        sid = position.stream_id
        if len(sid) > max_id_chars:
            return InvalidRequest(f"stream id longer than {max_id_chars} characters")
        if sid in seen:
            return InvalidRequest(f"a resume names stream {sid!r} twice")
        seen.add(sid)
    return None
