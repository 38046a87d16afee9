"""Sessions on Redis: many servers serve one session, and a dead server's streams go on.

The sans-I/O session (server/core/session.py) keeps doing all the work; this driver writes
what it did to Redis and feeds it what other servers wrote. Nothing here is on the path of a
token to its own client: a server whose client is attached writes to its socket first and to
Redis behind it.

Keys (all of one session on one Cluster slot, see base.py):

    {s:ID}:meta         hash   token_hash (SHA-256), owner (API key id), api, attached (the server
                               holding the client, "" when detached), detached_ms, epoch, closed
    {s:ID}:streams      hash   stream id -> its request as JSON (what a takeover sends again)
    {s:ID}:owner        hash   live stream id -> the server generating it (its lease: see below)
    {s:ID}:conv         hash   conversation -> its history as JSON
    {s:ID}:f:STREAM     stream the stream's frames, entry id `<seq>-0`, field `f` = the
                               `ServerFrame` bytes, MAXLEN ~ max_replay_frames
    servers             zset   server id -> its last heartbeat (ms)
    server:ID:streams   set    "session\\0stream" of every live stream that server generates
    inbox:ID            stream messages to that server: kick a connection (resumed elsewhere),
                               a client's cancel or modify of a stream it generates

Writing. `mark(runtime)` puts a session on the dirty list; one writer task takes every dirty
session (`Session.take_changes`: new frames, started and ended streams, conversations) and
writes them in one pipeline, then the next batch. While a pipeline is in flight the next
batch grows: one round trip per loop turn at most, never one per token. A batch that fails
(Redis away) is kept and written again first when Redis answers; the frames stay in the
sessions' replay buffers meanwhile, so a client attached here loses nothing. Frame entry ids
are the frames' seqs, so a frame written twice is refused by Redis (harmless), and a server
that lost a stream to a takeover (it was thought dead) cannot write behind the new owner's
frames: its write is refused, the frame never reaches its client, and it stops generating the
stream (fencing).

Reading. A resume of a session this server does not hold (or holds only in part) reads the
session from Redis, checks the token's hash, and replays each named stream from its Redis
Stream after the client's `seq`; streams that other servers generate are then followed: one
`XREAD BLOCK` over every followed stream and this server's inbox carries their new frames.

Leases and takeover. Each server writes a heartbeat every `lease_s / 6` (the server's lease on
all its streams); the `owner` hash says which server holds each live stream. A server whose
heartbeat is older than four beats is dead, and every server looks for dead ones every beat, so
a dead server's streams are claimed within `lease_s` (3 s by default) of its death: another
server claims each of its streams (an atomic compare-and-set on the owner field),
reads its request and frames, and continues it (`Session.adopt`): through the router's
continuation when the model allows one (`after_first_token: continue`), otherwise the stream
ends with a typed error carrying the partial usage. A server only claims after it has itself
reached Redis for a full lease period, so after a Redis outage every live server has renewed
its heartbeat before anyone looks for dead ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.request import ChatMessage, ChatRequest
from server.core.session import ForwardFrame, Session
from server.core.stream import Stream
from server.store.base import RedisStore, cluster_key, session_key
from server.store.codec import dump_messages, dump_request, load_messages, load_request

if TYPE_CHECKING:
    from server.service import SessionRuntime

log = logging.getLogger("llmproxy.store")

FOLLOW_BLOCK_MS = 400  # one XREAD waits this long for new frames (below the 1 s command timeout)
TTL_REFRESH_MS = 60_000  # a session's keys get their TTL renewed at most this often
SEP = b"\x00"

_ATTACH = """
local prev = redis.call('HGET', KEYS[1], 'attached')
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'attached', ARGV[1], 'detached_ms', 0)
return {prev or '', epoch}
"""
_DETACH = """
if redis.call('HGET', KEYS[1], 'attached') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'attached', '', 'detached_ms', ARGV[2])
  return 1
end
return 0
"""
# Every frame of a batch in one call: ARGV[2] holds records of (key, entry id, frame), each a
# 4-byte big-endian length and the bytes. Returns the (1-based) records Redis refused because
# their entry id is not above the stream's last: written before, or another server's.
_WRITE_FRAMES = """
local blob, pos, n, refused = ARGV[2], 1, 0, {}
local size = #blob
local function field()
  local len
  len, pos = struct.unpack('>I4', blob, pos)
  local value = string.sub(blob, pos, pos + len - 1)
  pos = pos + len
  return value
end
while pos <= size do
  local key = field()
  local id = field()
  local frame = field()
  n = n + 1
  if not pcall(redis.call, 'XADD', key, 'MAXLEN', '~', ARGV[1], id, 'f', frame) then
    refused[#refused + 1] = n
  end
end
return refused
"""
_RELEASE_OWNER = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
_CLAIM = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


def _pack_frames(frames: list[tuple[bytes, int, bytes, SessionRuntime, str]]) -> bytes:
    """The records of `_WRITE_FRAMES`: key (already length-prefixed), entry id and frame, each
    length-prefixed."""
    parts: list[bytes] = []
    for packed_key, seq, data, _, _ in frames:
        i = b"%d-0" % seq
        parts += (packed_key, len(i).to_bytes(4, "big"), i, len(data).to_bytes(4, "big"), data)
    return b"".join(parts)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).hexdigest().encode()


def frames_key(session_id: str, stream_id: str) -> str:
    return session_key(session_id, "f", stream_id)


@dataclass(slots=True)
class SyncState:
    """What the store knows of one session runtime on this server."""

    written: bool = False  # its meta is in Redis
    attach: str = ""  # "attach" / "detach": to write
    epoch: int = 0  # of this server's last attach
    ttl_due_ms: int = 0
    close: bool = False
    untimed: set[str] = field(default_factory=set)  # streams whose frames key has no TTL yet
    keys: dict[str, bytes] = field(default_factory=dict)  # stream id -> its frames key, length-prefixed


@dataclass(slots=True)
class Loaded:
    """A session as Redis has it, for a resume."""

    owner: str
    api: str
    requests: dict[str, tuple[ChatRequest, str]]  # stream id -> (request, conversation)
    servers: dict[str, str]  # live stream id -> the server generating it
    conversations: dict[str, list[ChatMessage]]
    frames: dict[str, list[tuple[bytes, pb.ServerFrame]]]  # named stream -> (entry id, frame)


@dataclass(slots=True)
class _Follow:
    runtime: SessionRuntime
    stream_id: str
    last_id: bytes


@dataclass(slots=True)
class _Batch:
    commands: list[tuple[Any, ...]] = field(default_factory=list)
    # per command: what its result means (None: nothing)
    tags: list[tuple[str, Any] | None] = field(default_factory=list)
    released: list[tuple[SessionRuntime, list[tuple[Stream, list[pb.ServerFrame]]]]] = field(default_factory=list)
    retried: bool = False  # released before Redis confirmed it: a refused frame was written before

    # the frames, written by one script call between the commands before and after them
    frames: list[tuple[bytes, int, bytes, SessionRuntime, str]] = field(default_factory=list)
    after: list[tuple[Any, ...]] = field(default_factory=list)  # commands after the frames

    def add(self, tag: tuple[str, Any] | None, *command: Any) -> None:
        self.commands.append(command)
        self.tags.append(tag)

    def __len__(self) -> int:
        return len(self.commands) + len(self.frames) + len(self.after)


class RedisSessions:
    """The session driver over Redis (one per server process)."""

    def __init__(
        self,
        store: RedisStore,
        runtime_of: Callable[[str], SessionRuntime | None],
        take_over: Callable[[str, bytes, bytes, list[tuple[bytes, pb.ServerFrame]], dict[bytes, bytes]], None],
        *,
        resume_grace_s: float,
        max_frames: int,
        lease_s: float = 3.0,
    ) -> None:
        self.store = store
        self.redis = store.redis
        self.me = store.server_id
        self._me_b = self.me.encode()
        self._runtime_of = runtime_of
        self._take_over = take_over
        self._grace_ms = int(resume_grace_s * 1000)
        self._ttl_ms = self._grace_ms + 600_000
        self._max_frames = max_frames
        # A heartbeat every `lease_s / 6`; a server silent for 4 of them is dead; the scan runs
        # every beat: a dead server's streams are claimed at most `lease_s` after its last beat.
        self.beat_s = lease_s / 6
        self.lease_ms = int(lease_s * 1000 * 4 / 6)
        self._dirty: dict[SessionRuntime, None] = {}
        self._wake = asyncio.Event()
        self._retry: _Batch | None = None
        self._follows: dict[bytes, _Follow] = {}
        self._inbox = cluster_key("inbox", self.me)
        self._inbox_last = b"0-0"
        self._servers = cluster_key("servers")
        self._mine = cluster_key("server", self.me, "streams")
        self._attach = self.redis.register_script(_ATTACH)
        self._detach = self.redis.register_script(_DETACH)
        self._claim = self.redis.register_script(_CLAIM)
        self._release_owner = self.redis.register_script(_RELEASE_OWNER)
        self._write_frames = self.redis.register_script(_WRITE_FRAMES)
        self.taken_over = 0  # streams this server took over
        self.batches = 0
        self.commands = 0

    # -- what the service tells us ---------------------------------------------------------------

    def mark(self, runtime: SessionRuntime) -> None:
        self._dirty[runtime] = None
        self._wake.set()

    def attached(self, runtime: SessionRuntime) -> None:
        runtime.sync.attach = "attach"
        self.mark(runtime)

    def detached(self, runtime: SessionRuntime) -> None:
        runtime.sync.attach = "detach"
        self.mark(runtime)

    def closed(self, runtime: SessionRuntime) -> None:
        runtime.sync.close = True
        self.mark(runtime)

    def forward(self, session_id: str, action: ForwardFrame) -> None:
        """A client's cancel or modify of a stream another server generates."""
        asyncio.ensure_future(self._forward(session_id, action))

    async def _forward(self, session_id: str, action: ForwardFrame) -> None:
        try:
            # The stream may have been taken over since it was followed: ask who holds it now.
            holder: Any = await self.redis.hget(session_key(session_id, "owner"), action.stream_id)
            server = holder.decode() if holder else action.server
            fields: dict[Any, Any] = {b"s": session_id.encode(), b"c": action.frame.SerializeToString()}
            await self.redis.xadd(cluster_key("inbox", server), fields, maxlen=10_000, approximate=True)
        except Exception as exc:
            log.warning("a %s of stream %r could not reach its server: %s", action.frame.WhichOneof("kind"), action.stream_id, exc)

    # -- writer ----------------------------------------------------------------------------------

    async def write_loop(self) -> None:
        """Writes what dirty sessions did, one pipeline at a time (a supervised job)."""
        wake = self._wake
        while True:
            try:
                await self._load_scripts()
                break
            except Exception:
                await asyncio.sleep(0.2)
        while True:
            await wake.wait()
            wake.clear()
            kept = self._retry
            if kept is not None and self.store.healthy:  # Redis is back: what it missed first, alone
                self._retry = None
                try:
                    self._after(kept, await self._execute(kept))
                except Exception as exc:
                    log.warning("store write failed again (%d commands kept): %s", len(kept), exc)
                    self._retry = kept
                    await asyncio.sleep(0.05)
                wake.set()
                continue
            batch = kept or _Batch()
            self._retry = None
            if self._dirty:
                dirty, self._dirty = self._dirty, {}
                now_ms = int(time.time() * 1000)
                for runtime in dirty:
                    self._add_session(batch, runtime, now_ms)
            if not len(batch):
                continue
            if not self.store.healthy:  # Redis away: clients get their frames now, Redis later
                self._keep(batch)
                await asyncio.sleep(0.05)
                wake.set()
                continue
            try:
                results = await self._execute(batch)
            except Exception as exc:  # keep the batch, write it first when Redis answers
                log.warning("store write failed (%d commands kept for later): %s", len(batch), exc)
                self._keep(batch)
                await asyncio.sleep(0.05)
                wake.set()
                continue
            self._release(batch, self._after(batch, results))

    def _keep(self, batch: _Batch) -> None:
        """Releases the batch's frames unconfirmed and keeps it for a retry."""
        self._release(batch)
        batch.retried = True
        self._retry = batch

    async def _execute(self, batch: _Batch) -> list[Any]:
        """One pipeline: the commands, then every frame in one script call (the replies of the
        frames' call: the indexes of frames refused), then the commands after them."""
        pipe = self.redis.pipeline(transaction=False)
        for command in batch.commands:
            await self._queue(pipe, command)
        if batch.frames:
            await self._queue(pipe, ("script", self._write_frames, [], [self._max_frames, _pack_frames(batch.frames)]))
        for command in batch.after:
            await self._queue(pipe, command)
        self.batches += 1
        self.commands += len(batch)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis restarted (or flushed its scripts): load them, write the batch again (its
            # frames already written are refused as written before, and its hashes rewritten).
            await self._load_scripts()
            batch.retried = True
            return await self._execute(batch)
        return results

    @staticmethod
    async def _queue(pipe: Any, command: tuple[Any, ...]) -> None:
        if command[0] == "script":  # by its SHA (redis-py's own pipeline scripts ask SCRIPT EXISTS each time)
            script, keys, args = command[1], command[2], command[3]
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        else:
            pipe.execute_command(*command)

    async def _load_scripts(self) -> None:
        for script in (self._attach, self._detach, self._release_owner, self._write_frames):
            script.sha = await self.redis.script_load(script.script)

    def _add_session(self, batch: _Batch, runtime: SessionRuntime, now_ms: int) -> None:
        session, state = runtime.session, runtime.sync
        sid = session.id
        meta = session_key(sid, "meta")
        if not state.written:
            state.written = True
            batch.add(None, "HSET", meta, "token_hash", token_hash(session.token), "owner", session.owner, "api", session.api, "created_ms", now_ms)
        if state.attach == "attach":
            batch.add(("attach", runtime), "script", self._attach, [meta], [self.me, now_ms])
        elif state.attach == "detach":
            batch.add(None, "script", self._detach, [meta], [self.me, now_ms])
        state.attach = ""
        changes = session.take_changes()
        if changes.frames:
            batch.released.append((runtime, changes.frames))
        mine = self._mine
        for stream in changes.started:
            batch.add(None, "HSET", session_key(sid, "streams"), stream.id, dump_request(stream.request, stream.conversation))
            batch.add(None, "HSET", session_key(sid, "owner"), stream.id, self.me)
            batch.add(None, "SADD", mine, sid.encode() + SEP + stream.id.encode())
            state.untimed.add(stream.id)
        keys = state.keys
        add_frame = batch.frames.append
        for stream, frames in changes.frames:
            packed_key = keys.get(stream.id)
            if packed_key is None:
                k = frames_key(sid, stream.id).encode()
                packed_key = keys[stream.id] = len(k).to_bytes(4, "big") + k
            for frame in frames:
                seq = getattr(frame, frame.WhichOneof("kind")).seq
                add_frame((packed_key, seq, frame.SerializeToString(), runtime, stream.id))
            if stream.id in state.untimed or state.ttl_due_ms <= now_ms:
                state.untimed.discard(stream.id)
                batch.after.append(("PEXPIRE", frames_key(sid, stream.id), self._ttl_ms))
        after = batch.after
        for stream in changes.ended:
            keys.pop(stream.id, None)
            after.append(("script", self._release_owner, [session_key(sid, "owner")], [stream.id, self.me]))
            after.append(("SREM", mine, sid.encode() + SEP + stream.id.encode()))
            after.append(("PEXPIRE", frames_key(sid, stream.id), self._ttl_ms))
        if changes.conversations:
            after.append(("HSET", session_key(sid, "conv"), *[x for name, history in changes.conversations.items() for x in (name, dump_messages(history))]))
        if state.close:
            state.close = False
            after.append(("HSET", meta, "closed", 1))
        if state.ttl_due_ms <= now_ms:
            state.ttl_due_ms = now_ms + TTL_REFRESH_MS
            for part in ("meta", "streams", "owner", "conv"):
                after.append(("PEXPIRE", session_key(sid, part), self._ttl_ms))

    @staticmethod
    def _release(batch: _Batch, fenced: set[tuple[SessionRuntime, str]] | None = None) -> None:
        """The batch's frames go to their clients (once: a batch kept for a retry has none
        left), but those of streams another server has taken over (`fenced`)."""
        for runtime, frames in batch.released:
            skip = {stream.id for stream, _ in frames if (runtime, stream.id) in fenced} if fenced else ()
            runtime.session.release(frames, skip)
            runtime.wake()
        batch.released = []

    def _after(self, batch: _Batch, results: list[Any]) -> set[tuple[SessionRuntime, str]]:
        """Acts on the results; returns the streams found taken over by another server."""
        kicks: list[tuple[str, str, int]] = []
        fenced: dict[tuple[SessionRuntime, str], int] = {}  # -> the first seq refused
        if batch.frames:
            refused = results[len(batch.commands)]
            if isinstance(refused, Exception):
                log.warning("store could not keep %d frames: %s", len(batch.frames), refused)
            elif not batch.retried:
                for index in refused:
                    # Another server wrote this seq: it took the stream over (this server was
                    # thought dead). Its frames win; this server stops generating the stream and
                    # follows it instead (its client here gets the new owner's frames).
                    _, seq, _, runtime, stream_id = batch.frames[int(index) - 1]
                    fenced.setdefault((runtime, stream_id), seq)
        for tag, result in zip(batch.tags, results):
            if tag is None:
                if isinstance(result, Exception):
                    log.warning("store command failed: %s", result)
                continue
            kind, what = tag[0], tag[1]
            if kind == "attach" and not isinstance(result, Exception):
                runtime = what
                previous, epoch = result[0].decode(), int(result[1])
                runtime.sync.epoch = epoch
                if previous and previous != self.me:
                    kicks.append((previous, runtime.session.id, epoch))
        for (runtime, stream_id), seq in fenced.items():
            log.error("stream %r of session %s was taken over by another server; following it here", stream_id, runtime.session.id)
            runtime.disown(stream_id)
            runtime.session.demote(stream_id, seq - 1)
            self.follow(runtime, stream_id, f"{seq - 1}-0".encode())
        for server, sid, epoch in kicks:
            asyncio.ensure_future(self._kick(server, sid, epoch))
        return set(fenced)

    async def _kick(self, server: str, session_id: str, epoch: int) -> None:
        try:
            fields: dict[Any, Any] = {b"k": session_id.encode(), b"e": str(epoch).encode()}
            await self.redis.xadd(cluster_key("inbox", server), fields, maxlen=10_000, approximate=True)
        except Exception as exc:
            log.warning("could not tell server %s that its session moved: %s", server, exc)

    # -- resume ----------------------------------------------------------------------------------

    async def load(self, resume: pb.Resume, key_id: str) -> Loaded | None:
        """The session `resume` names, if its token and key match and it is not closed."""
        sid = resume.session_id
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(session_key(sid, "meta"))
        pipe.hgetall(session_key(sid, "streams"))
        pipe.hgetall(session_key(sid, "owner"))
        pipe.hgetall(session_key(sid, "conv"))
        for position in resume.streams:
            pipe.xrange(frames_key(sid, position.stream_id), min=f"{position.last_seq + 1}-0", max="+")
        results = await pipe.execute()
        meta: dict[bytes, bytes] = results[0]
        expected = meta.get(b"token_hash", b"0" * 64)
        if not hmac.compare_digest(expected, token_hash(resume.resume_token)) or not meta or meta.get(b"closed"):
            return None
        if meta.get(b"owner", b"").decode() != key_id:
            return None
        requests = {k.decode(): load_request(v) for k, v in results[1].items()}
        servers = {k.decode(): v.decode() for k, v in results[2].items()}
        conversations = {k.decode(): load_messages(v) for k, v in results[3].items()}
        frames: dict[str, list[tuple[bytes, pb.ServerFrame]]] = {}
        for position, entries in zip(resume.streams, results[4:]):
            frames[position.stream_id] = [(entry_id, pb.ServerFrame.FromString(fields[b"f"])) for entry_id, fields in entries]
        return Loaded(meta.get(b"owner", b"").decode(), meta.get(b"api", b"").decode(), requests, servers, conversations, frames)

    def follow(self, runtime: SessionRuntime, stream_id: str, after_id: bytes) -> None:
        """Feeds `runtime` the frames of a stream another server generates, after `after_id`."""
        key = frames_key(runtime.session.id, stream_id).encode()
        self._follows[key] = _Follow(runtime, stream_id, after_id)
        asyncio.ensure_future(self._nudge())

    async def _nudge(self) -> None:
        """Wakes this server's blocked XREAD so it reads the new stream at once."""
        try:
            wake: dict[Any, Any] = {b"w": b""}
            await self.redis.xadd(self._inbox, wake, maxlen=10_000, approximate=True)
        except Exception:
            pass

    async def follow_loop(self) -> None:
        """Reads followed streams and the inbox (a supervised job)."""
        redis = self.redis
        while True:
            if not self.store.healthy:
                await asyncio.sleep(0.1)
                continue
            streams: dict[Any, Any] = {self._inbox: self._inbox_last}
            for key, follow in self._follows.items():
                streams[key] = follow.last_id
            try:
                found: Any = await redis.xread(streams, count=512, block=FOLLOW_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("follow read failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            now_ns = time.monotonic_ns()
            for key, entries in found or ():
                if key == self._inbox.encode():
                    for entry_id, fields in entries:
                        self._inbox_last = entry_id
                        self._message(fields)
                    continue
                followed = self._follows.get(key)
                if followed is None:
                    continue
                follow = followed
                session = follow.runtime.session
                live = True
                for entry_id, fields in entries:
                    follow.last_id = entry_id
                    live = session.receive_remote(follow.stream_id, pb.ServerFrame.FromString(fields[b"f"]), now_ns)
                    if not live:
                        break
                follow.runtime.wake()
                if not live and self._follows.get(key) is follow:
                    del self._follows[key]

    def _message(self, fields: dict[bytes, bytes]) -> None:
        if b"k" in fields:  # the session was resumed on another server
            runtime = self._runtime_of(fields[b"k"].decode())
            if runtime is not None and runtime.owner is not None and runtime.sync.epoch < int(fields.get(b"e", b"0")):
                from server.service import Kick

                runtime.owner.kick(Kick.RESUMED_ELSEWHERE)
        elif b"c" in fields:  # a cancel or modify from the server that holds the client
            runtime = self._runtime_of(fields[b"s"].decode())
            if runtime is not None:
                runtime.receive_checked(pb.ClientFrame.FromString(fields[b"c"]), None)  # admitted where the client is

    # -- expiry ----------------------------------------------------------------------------------

    async def verdicts(self, sessions: list[Session]) -> dict[str, str]:
        """For sessions detached here past the grace period: "expire" (closed everywhere),
        "elsewhere" (attached on another server), or "wait" (detached more recently elsewhere)."""
        pipe = self.redis.pipeline(transaction=False)
        for session in sessions:
            pipe.hmget(session_key(session.id, "meta"), ["attached", "detached_ms"])
        results = await pipe.execute()
        now_ms = int(time.time() * 1000)
        out: dict[str, str] = {}
        for session, (attached, detached_ms) in zip(sessions, results):
            holder = (attached or b"").decode()
            if holder and holder != self.me:
                out[session.id] = "elsewhere"
            elif not holder and detached_ms and now_ms - int(detached_ms) < self._grace_ms:
                out[session.id] = "wait"
            else:
                out[session.id] = "expire"
        return out

    # -- leases and takeover ---------------------------------------------------------------------

    async def lease_loop(self) -> None:
        """Heartbeats, and takes over the streams of servers whose heartbeat lapsed."""
        interval = self.beat_s
        healthy_since: float | None = None
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            try:
                await self.redis.zadd(self._servers, {self.me: int(now * 1000)})
            except Exception:
                healthy_since = None
                continue
            if healthy_since is None:
                healthy_since = now
            if (now - healthy_since) * 1000 < self.lease_ms:
                continue  # after an outage, wait until every live server has renewed
            try:
                await self._claim_dead(int(now * 1000))
            except Exception as exc:
                log.warning("takeover scan failed: %s", exc)

    async def _claim_dead(self, now_ms: int) -> None:
        dead: Any = await self.redis.zrangebyscore(self._servers, "-inf", now_ms - self.lease_ms)
        for server in dead:
            if server == self._me_b:
                continue
            theirs = cluster_key("server", server.decode(), "streams")
            members: Any = await self.redis.srandmember(theirs, 64)
            if not members:
                await self.redis.zrem(self._servers, server)
                continue
            for member in members:
                sid_b, _, stream_b = member.partition(SEP)
                sid = sid_b.decode()
                won = await self._claim(keys=[session_key(sid, "owner")], args=[stream_b, server, self.me])
                await self.redis.srem(theirs, member)
                if not won:
                    continue
                await self.redis.sadd(cluster_key("server", self.me, "streams"), member)
                await self._adopt(sid, stream_b, server)

    async def _adopt(self, sid: str, stream_b: bytes, dead: bytes) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(session_key(sid, "meta"))
        pipe.hget(session_key(sid, "streams"), stream_b)
        pipe.xrange(frames_key(sid, stream_b.decode()), min="-", max="+")
        meta, request, entries = await pipe.execute()
        if not request:
            log.warning("stream %r of session %s has no request in the store; it cannot be taken over", stream_b, sid)
            return
        frames = [(entry_id, pb.ServerFrame.FromString(fields[b"f"])) for entry_id, fields in entries]
        self.taken_over += 1
        log.warning("taking over stream %r of session %s from server %s (dead), %d frames", stream_b.decode(), sid, dead.decode(), len(frames))
        self._take_over(sid, stream_b, request, frames, meta)

    # -- shutdown --------------------------------------------------------------------------------

    async def leave(self) -> None:
        """A clean stop: the heartbeat goes at once, so takeover of what is left starts now."""
        try:
            await self.redis.zadd(self._servers, {self.me: 0})
        except Exception:
            pass
