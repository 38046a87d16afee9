"""Per-key limits and revocations across servers on one Redis (issue 14, point 4): real
redis-server, real server processes, each with its own copy of the key file (as servers on
different machines would have), clients over gRPC `Stream` calls and through a bridge."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from server.auth.limits import KeyLimits
from server.auth.store import KeyStore
from tests.support.procs import ROOT, Proc, start_bridge, start_server
from tests.support.ws import open_ws, recv, send, start_frame

# Unpaced demo: a stream is over a few ms after its start, so requests are cheap.
QUICK = ("--demo", "all-keys", "--demo-ttft-ms", "5", "--demo-tokens-per-s", "0", "--max-streams", "256")
# Paced demo: a stream of 1000 tokens lasts 50 s, as long as a test needs it live.
PACED = ("--demo", "all-keys", "--demo-ttft-ms", "5", "--demo-tokens-per-s", "20", "--demo-jitter", "0")


def make_key(directory, copies: int, limits: KeyLimits) -> tuple[str, str, list[str]]:
    """One key in a key file, copied once per server: (key, key id, the copies' paths)."""
    db = directory / "keys.sqlite3"
    store = KeyStore(str(db))
    key, record = store.create("cluster", limits)
    store.close()
    paths = []
    for i in range(copies):
        path = directory / f"keys-{i}.sqlite3"
        shutil.copy(db, path)
        paths.append(str(path))
    return key, record.key_id, paths


@contextmanager
def servers(redis_url: str, dbs: list[str], *extra: str) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        for db in dbs:
            started.append(start_server("--store", redis_url, "--auth-db", db, *extra))
        yield started
    except BaseException:
        for i, p in enumerate(started):  # shown by pytest with the failure
            print(f"--- server {i + 1} log tail ---", *p.lines[-40:], sep="\n")
        raise
    finally:
        for p in started:
            p.stop()


def start_of(sid: str, max_tokens: int) -> pb.ClientFrame:
    msg = pb.ChatMessage(role="user", content="hi")
    return pb.ClientFrame(start=pb.StartStream(stream_id=sid, model="demo", messages=[msg], params=pb.GenerationParams(max_tokens=max_tokens)))


class GrpcConn:
    """One `Stream` call; records each stream's end: "done", or the error code's name (a
    refusal has seq 0)."""

    def __init__(self, target: str, key: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.call = pb_grpc.LLMProxyStub(self.channel).Stream(metadata=(("authorization", f"Bearer {key}"),))
        self.ends: dict[str, tuple[str, int]] = {}  # stream id -> (end, seq)
        self.started: set[str] = set()
        self.session: pb.SessionInfo | None = None
        self.resumed: pb.Resumed | None = None
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.call:
                kind = frame.WhichOneof("kind")
                if kind == "started":
                    self.started.add(frame.started.stream_id)
                elif kind == "session":
                    self.session = frame.session
                elif kind == "resumed":
                    self.resumed = frame.resumed
                elif kind == "done":
                    self.ends[frame.done.stream_id] = ("done", frame.done.seq)
                elif kind == "error":
                    self.ends[frame.error.stream_id] = (pb.ErrorCode.Name(frame.error.code), frame.error.seq)
                self.changed.set()
        finally:
            self.changed.set()  # the call ended: waiters see it

    async def start(self, sid: str, max_tokens: int = 2) -> None:
        await self.call.write(start_of(sid, max_tokens))

    async def cancel(self, sid: str) -> None:
        await self.call.write(pb.ClientFrame(cancel=pb.CancelStream(stream_id=sid)))

    async def wait(self, predicate, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self.changed.clear()
            if self.reader.done():
                self.reader.result()  # raises the call's error
                raise AssertionError("the call ended")
            await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - time.monotonic()))

    async def end_of(self, sid: str, timeout_s: float = 20.0) -> tuple[str, int]:
        await self.wait(lambda: sid in self.ends, timeout_s)
        return self.ends[sid]

    async def wait_started(self, sid: str) -> None:
        await self.wait(lambda: sid in self.started or sid in self.ends)
        assert sid in self.started, self.ends.get(sid)

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


async def admitted(conn: GrpcConn, sid: str) -> bool:
    """Starts a long stream: whether it started (else it was refused too_many_streams)."""
    await conn.start(sid, 1000)
    await conn.wait(lambda: sid in conn.started or sid in conn.ends)
    if sid in conn.started:
        return True
    assert conn.ends[sid] == ("ERROR_CODE_TOO_MANY_STREAMS", 0)
    return False


async def refused_connection(target: str, key: str) -> grpc.StatusCode | None:
    """Opens a `Stream` call and starts a stream: the call's status if it was refused, None if
    the stream ran."""
    conn = GrpcConn(target, key)
    try:
        await conn.start("probe", 1)
        await conn.end_of("probe", 5.0)
        return None
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await conn.close()


# -- (a) one rate over three servers ------------------------------------------------------------


async def test_requests_per_minute_hold_over_three_servers(redis_server, tmp_path):
    key, _, dbs = make_key(tmp_path, 3, KeyLimits(rpm=60))
    with servers(redis_server.url, dbs, *QUICK) as procs:
        bridge = start_bridge(procs[2].address)
        try:
            g1, g2 = GrpcConn(procs[0].address, key), GrpcConn(procs[1].address, key)
            ends: dict[str, str] = {}
            async with open_ws(bridge.address, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
                ws_ids: set[str] = set()
                for i in range(200):  # round robin: server 1 and 2 over gRPC, server 3 through the bridge
                    sid = f"r{i}"
                    if i % 3 == 0:
                        await g1.start(sid)
                    elif i % 3 == 1:
                        await g2.start(sid)
                    else:
                        ws_ids.add(sid)
                        await send(ws, start_frame(sid, max_tokens=2))
                deadline = time.monotonic() + 60
                while ws_ids - ends.keys():  # a refusal is an error of seq 0, an admitted stream ends done
                    frame = await recv(ws, deadline - time.monotonic())
                    if frame["type"] == "done" or (frame["type"] == "error" and frame["id"] in ws_ids):
                        ends[frame["id"]] = "done" if frame["type"] == "done" else frame["code"]
                        if frame["type"] == "error":
                            assert frame["seq"] == 0 and frame["retryable"] and 0 < frame["retry_after_ms"] <= 60_000, frame
            for conn in (g1, g2):
                await conn.wait(lambda conn=conn: len(conn.ends) == sum(1 for i in range(200) if i % 3 == (0 if conn is g1 else 1)), 60)
                for sid, (end, seq) in conn.ends.items():
                    ends[sid] = "done" if end == "done" else {"ERROR_CODE_RATE_LIMITED": "rate_limited"}.get(end, end)
                    assert end == "done" or seq == 0, (sid, end, seq)
                await conn.close()
        finally:
            bridge.stop()
    assert len(ends) == 200
    accepted = sum(1 for e in ends.values() if e == "done")
    print(f"accepted {accepted} of 200 at 60 per minute over 3 servers")
    assert 57 <= accepted <= 63, accepted
    assert {e for e in ends.values() if e != "done"} == {"rate_limited"}
    # every server admitted some: the limit is shared, not one server's
    assert all(any(ends[f"r{i}"] == "done" for i in range(200) if i % 3 == s) for s in range(3))


# -- (b) revocation on one server, refused by the others within 1 s ------------------------------


async def test_a_key_revoked_on_one_server_is_refused_by_the_others_within_a_second(redis_server, tmp_path):
    key, key_id, dbs = make_key(tmp_path, 3, KeyLimits())
    with servers(redis_server.url, dbs, *PACED) as procs:
        others = procs[1:]
        opened = [GrpcConn(p.address, key) for p in others]  # connections opened before the revocation
        try:
            for i, conn in enumerate(opened):
                await conn.start("before", 1)
                assert (await conn.end_of("before"))[0] == "done"
                await conn.start("long", 1000)  # runs for 50 s unless cancelled
                await conn.wait_started("long")
            # Measured from the CLI's launch: the write happens somewhere before it exits, so
            # these delays are upper bounds (they include the CLI's own ~0.15 s).
            revoked_at = time.monotonic()
            out = subprocess.run(
                [sys.executable, "-m", "server.auth.cli", "revoke", "--db", dbs[0], key_id, "--cancel-streams"],
                cwd=ROOT, capture_output=True, text=True, timeout=30,
            )
            assert out.returncode == 0, out.stderr
            print(f"the CLI ran {time.monotonic() - revoked_at:.3f} s")

            async def new_connection_refused(target: str) -> float:
                while (code := await refused_connection(target, key)) is None:
                    assert time.monotonic() - revoked_at < 5, "never refused"
                assert code == grpc.StatusCode.UNAUTHENTICATED
                return time.monotonic() - revoked_at

            async def start_refused(conn: GrpcConn) -> float:
                n = 0
                while True:
                    n += 1
                    await conn.start(f"p{n}", 1)
                    end, seq = await conn.end_of(f"p{n}", 5.0)
                    if end != "done":
                        assert end == "ERROR_CODE_UNAUTHENTICATED", end
                        if seq == 0:  # refused; a seq > 0 is a probe that started and was cancelled
                            return time.monotonic() - revoked_at
                    assert time.monotonic() - revoked_at < 5, "never refused"

            async def streams_cancelled(conn: GrpcConn) -> float:
                end, seq = await conn.end_of("long", 5.0)
                assert end == "ERROR_CODE_UNAUTHENTICATED" and seq > 0
                return time.monotonic() - revoked_at

            delays = await asyncio.gather(
                *(new_connection_refused(p.address) for p in others),
                *(start_refused(c) for c in opened),
                *(streams_cancelled(c) for c in opened),
            )
            print("revocation delays (s):", [round(d, 3) for d in delays])
            assert max(delays) < 1.0, delays
        finally:
            for conn in opened:
                await conn.close()


# -- (c) concurrent streams over two servers; a dead server's streams lapse -----------------------


async def test_concurrent_streams_hold_over_two_servers_and_a_dead_servers_lapse(redis_server, tmp_path):
    key, _, dbs = make_key(tmp_path, 2, KeyLimits(concurrency=3))
    with servers(redis_server.url, dbs, *PACED) as (one, two):
        a, b = GrpcConn(one.address, key), GrpcConn(two.address, key)
        try:
            for sid in ("a1", "a2"):
                await a.start(sid, 1000)
                await a.wait_started(sid)
            await b.start("b1", 1000)
            await b.wait_started("b1")
            await b.start("b2", 1000)
            assert await b.end_of("b2") == ("ERROR_CODE_TOO_MANY_STREAMS", 0)
            await a.start("a3", 1000)
            assert await a.end_of("a3") == ("ERROR_CODE_TOO_MANY_STREAMS", 0)
            # a stream ends on server one: server two may start one after server one's next sync
            await a.cancel("a1")
            await a.end_of("a1")
            ended_at = time.monotonic()
            n = 0
            while not await admitted(b, f"b-after-{n}"):
                n += 1
                assert time.monotonic() - ended_at < 5, "an ended stream still counts"
                await asyncio.sleep(0.1)
            freed_s = time.monotonic() - ended_at
            assert not await admitted(b, "b-over")  # 3 live again: a2, b1, b-after
            # server one dies holding a2: within its lease (6 s) server two may take that slot
            one.kill()
            killed_at = time.monotonic()
            n = 0
            while not await admitted(b, f"b-dead-{n}"):
                n += 1
                assert time.monotonic() - killed_at < 10, "a dead server's streams still count"
                await asyncio.sleep(0.2)
            print(f"slot freed {freed_s:.2f} s after a stream ended, {time.monotonic() - killed_at:.2f} s after its server died")
        finally:
            await a.close()
            await b.close()


# -- Redis unreachable: refused as unavailable, never admitted, never hanging ---------------------


async def test_a_start_while_redis_is_unreachable_is_refused_unavailable(redis_server, tmp_path):
    key, _, dbs = make_key(tmp_path, 1, KeyLimits(rpm=1000))
    with servers(redis_server.url, dbs, *QUICK) as (server,):
        conn = GrpcConn(server.address, key)
        try:
            await conn.start("ok", 2)
            assert (await conn.end_of("ok"))[0] == "done"
            redis_server.pause()
            try:
                began = time.monotonic()
                await conn.start("down", 2)
                assert await conn.end_of("down", 10.0) == ("ERROR_CODE_UNAVAILABLE", 0)
                assert time.monotonic() - began < 3.0
            finally:
                redis_server.resume()
            n, deadline = 0, time.monotonic() + 10
            while True:  # admitted again once the store answers
                n += 1
                await conn.start(f"back{n}", 2)
                if (await conn.end_of(f"back{n}"))[0] == "done":
                    break
                assert time.monotonic() < deadline, "never admitted again"
                await asyncio.sleep(0.2)
        finally:
            await conn.close()


# -- the key CLI writes a revocation straight to Redis -----------------------------------------


async def test_the_cli_revokes_in_redis_for_servers_whose_files_lack_it(redis_server, tmp_path):
    key, key_id, dbs = make_key(tmp_path, 3, KeyLimits())
    with servers(redis_server.url, dbs[:2], *QUICK) as procs:  # the third copy is the operator's
        assert all([await refused_connection(p.address, key) is None for p in procs])
        revoked_at = time.monotonic()  # from the CLI's launch: an upper bound
        out = subprocess.run(
            [sys.executable, "-m", "server.auth.cli", "revoke", "--db", dbs[2], key_id, "--store", redis_server.url],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        for p in procs:
            while (code := await refused_connection(p.address, key)) is None:
                assert time.monotonic() - revoked_at < 1.0, "not refused within 1 s"
            assert code == grpc.StatusCode.UNAUTHENTICATED


# -- connections over servers ---------------------------------------------------------------------


async def test_open_connections_count_over_servers(redis_server, tmp_path):
    key, _, dbs = make_key(tmp_path, 2, KeyLimits(connections=1))
    with servers(redis_server.url, dbs, *QUICK) as (one, two):
        held = GrpcConn(one.address, key)
        try:
            await held.start("s", 1)
            assert (await held.end_of("s"))[0] == "done"
            # server one publishes its connection at its next sync (0.5 s): then two refuses
            deadline = time.monotonic() + 5
            while (code := await refused_connection(two.address, key)) is None:
                assert time.monotonic() < deadline, "server two never counted server one's connection"
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await held.close()
        deadline = time.monotonic() + 5  # closed: withdrawn at server one's next sync
        while await refused_connection(two.address, key) is not None:
            assert time.monotonic() < deadline, "a closed connection still counts"
            await asyncio.sleep(0.1)


# -- a stream resumed through another server counts once ----------------------------------------


async def test_a_stream_followed_on_another_server_counts_once(redis_server, tmp_path):
    key, _, dbs = make_key(tmp_path, 2, KeyLimits(concurrency=2))
    with servers(redis_server.url, dbs, *PACED, "--resume-grace-s", "30") as (one, two):
        first = GrpcConn(one.address, key)
        await first.start("s1", 1000)  # generated by server one for 50 s
        await first.wait_started("s1")
        session = first.session
        assert session is not None
        await first.close()  # the client drops; the stream goes on
        second = GrpcConn(two.address, key)
        try:
            resume = pb.Resume(session_id=session.session_id, resume_token=session.resume_token, streams=[pb.StreamPosition(stream_id="s1", last_seq=0)])
            await second.call.write(pb.ClientFrame(resume=resume))
            await second.wait(lambda: second.resumed is not None or "" in second.ends)
            assert second.resumed is not None, second.ends
            # server two follows s1, server one generates it: one live stream of two
            assert await admitted(second, "s2")
            refused = not await admitted(second, "s3")
            assert "s1" not in second.ends, f"s1 ended early: {second.ends}"  # else the premise is gone
            assert refused, second.ends
        finally:
            await second.close()


# -- tokens charged on one server count on the others --------------------------------------------


async def test_a_budget_spent_on_one_server_is_refused_on_another(redis_server, tmp_path):
    key, _, dbs = make_key(tmp_path, 2, KeyLimits(budget_tokens=10))
    with servers(redis_server.url, dbs, *QUICK) as (one, two):
        a, b = GrpcConn(one.address, key), GrpcConn(two.address, key)
        try:
            await a.start("spend", 12)
            assert (await a.end_of("spend"))[0] == "done"
            # charged as server one reports the ended stream (~1 s) and syncs (0.5 s)
            deadline, n = time.monotonic() + 10, 0
            while True:
                n += 1
                await b.start(f"b{n}", 1)
                end, seq = await b.end_of(f"b{n}")
                if end != "done":
                    assert (end, seq) == ("ERROR_CODE_QUOTA_EXCEEDED", 0)
                    break
                assert time.monotonic() < deadline, "server two never saw server one's tokens"
                await asyncio.sleep(0.2)
        finally:
            await a.close()
            await b.close()


# -- a call half-closed right after its start still gets the stream ----------------------------------


async def test_a_start_then_half_close_is_answered_in_full(redis_server, tmp_path):
    # The start is still being checked in Redis when the client's writes end: the call must not
    # end before the stream has run (a half-closed call ends once its streams have).
    key, _, dbs = make_key(tmp_path, 1, KeyLimits(rpm=1000))
    with servers(redis_server.url, dbs, *QUICK) as (server,):
        for i in range(20):
            async with grpc.aio.insecure_channel(server.address) as channel:
                call = pb_grpc.LLMProxyStub(channel).Stream(metadata=(("authorization", f"Bearer {key}"),))
                await call.write(start_of("h", 3))
                await call.done_writing()
                kinds = [f.WhichOneof("kind") async for f in call]
            # Without the wait the call ended right after `session`, the start still in Redis.
            assert kinds[:2] == ["session", "started"] and kinds[-1] == "done", (i, kinds)
