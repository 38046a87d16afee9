"""A WebSocket's link on the relay, with a fake socket: it never goes mute, and every way it
ends says why, with a typed error and a close code of its own."""

from __future__ import annotations

import asyncio

import orjson
from websockets.protocol import State

from bridge.server import WSLink
from llmproxy.v1 import llmproxy_pb2 as pb


class FakeProtocol:
    state = State.OPEN

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send_text(self, data: bytes) -> None:
        self.sent.append(orjson.loads(data))


class FakeTransport:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


class FakeWS:
    paused = False

    def __init__(self) -> None:
        self.protocol = FakeProtocol()
        self.transport = FakeTransport()
        self.closed: tuple[int, str] | None = None

    def send_data(self) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


class FakeRelay:
    def __init__(self) -> None:
        self.sent: list[pb.ClientFrame] = []
        self.closes: list[bool] = []
        self.forgotten = 0

    def send(self, conn: int, frame: pb.ClientFrame) -> None:
        self.sent.append(frame)

    def close(self, conn: int, end_session: bool) -> None:
        self.closes.append(end_session)

    def forget(self, conn: int) -> None:
        self.forgotten += 1


def link() -> tuple[WSLink, FakeWS, FakeRelay]:
    ws, relay = FakeWS(), FakeRelay()
    return WSLink(ws, relay, pb.RelayOpen(), 1 << 20), ws, relay  # type: ignore[arg-type]


async def test_a_frame_the_bridge_cannot_encode_closes_the_connection_with_a_typed_error():
    lnk, ws, relay = link()
    lnk.deliver(pb.ServerFrame(token=pb.TokenDelta(stream_id="a", seq=2, text="ok")))
    lnk.deliver(pb.ServerFrame())  # an empty oneof: what a newer server's unknown frame looks like
    lnk.flush()
    await asyncio.sleep(0)  # the close is sent by a task
    assert [f["type"] for f in ws.protocol.sent] == ["error"]
    assert ws.protocol.sent[0]["code"] == "internal"
    assert ws.closed is not None and ws.closed[0] == 1011
    assert relay.closes == [False]  # the session is only detached: it stays resumable


async def test_resumed_elsewhere_and_slow_reader_have_their_own_codes():
    for code, close_code, name in ((pb.ERROR_CODE_RESUMED_ELSEWHERE, 4001, "resumed_elsewhere"), (pb.ERROR_CODE_EXPIRED, 1012, "expired")):
        lnk, ws, relay = link()
        lnk.ended(code, "why")
        await asyncio.sleep(0)
        assert ws.protocol.sent[-1]["code"] == name
        assert ws.closed is not None and ws.closed[0] == close_code
        assert relay.forgotten == 1 and relay.closes == []  # the server already forgot it


def test_reopen_resumes_with_what_was_received_and_resends_lost_starts():
    lnk, ws, relay = link()
    lnk.deliver(pb.ServerFrame(session=pb.SessionInfo(session_id="S", resume_token="T")))
    start = pb.ClientFrame(start=pb.StartStream(stream_id="b", model="demo"))
    lnk.receive(pb.ClientFrame(start=pb.StartStream(stream_id="a", model="demo")))
    lnk.receive(start)
    lnk.deliver(pb.ServerFrame(started=pb.StreamStarted(stream_id="a", seq=1)))
    lnk.deliver(pb.ServerFrame(token=pb.TokenDelta(stream_id="a", seq=5, text="x", count=4)))
    lnk.flush()
    lnk.relay_lost()
    opening = lnk.reopen()
    assert (opening.resume.session_id, opening.resume.resume_token) == ("S", "T")
    assert {(p.stream_id, p.last_seq) for p in opening.resume.streams} == {("a", 5), ("b", 0)}
    relay.sent.clear()
    resumed = pb.ServerFrame(resumed=pb.Resumed(session_id="S"))
    resumed.resumed.streams.add(stream_id="a", after_seq=5, known=True, live=True)
    resumed.resumed.streams.add(stream_id="b", after_seq=0, known=False)
    lnk.deliver(resumed)
    lnk.flush()
    assert relay.sent == [start]  # b never reached the server: sent again
    assert all(f["type"] != "resumed" for f in ws.protocol.sent)  # the client never sees our resume
