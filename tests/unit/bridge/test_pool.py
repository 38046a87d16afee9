"""The bridge's relay pool (bridge/pool.py), fed by hand: no sockets. A link's call coming up and
failing is what `RelayLink._read_loop` (first message) and `RelayLink._end` do."""

from __future__ import annotations

import pytest

from bridge.pool import RelayPool, parse_targets
from bridge.relay import RelayLink
from llmproxy.v1 import llmproxy_pb2 as pb


class FakeChannel:
    def stream_stream(self, *args, **kwargs):  # what the generated stub asks of a channel
        return lambda **kw: None


class FakeLink:
    def __init__(self, session: str = "") -> None:
        self.session = session
        self.lost = 0

    def relay_lost(self) -> None:
        self.lost += 1

    def reopen(self) -> pb.RelayOpen:
        opening = pb.RelayOpen(peer="p")
        if self.session:
            opening.resume.session_id = self.session
        return opening


def come_up(relay: RelayLink) -> None:
    relay._begin()
    relay.up = True
    relay._on_change(relay)  # type: ignore[misc]


def entries(relay: RelayLink) -> list[tuple[int, str]]:
    return [(e.conn, e.WhichOneof("kind")) for b in [*relay._full, relay._batch] for e in b.entries]


def pool_of(n: int) -> RelayPool:
    return RelayPool([FakeChannel() for _ in range(n)], "t" * 32)  # type: ignore[misc]


def test_targets_are_parsed_in_order_without_duplicates():
    assert parse_targets("a:1") == ("a:1",)
    assert parse_targets("a:1, b:2,a:1") == ("a:1", "b:2")
    for bad in ("", "a:1,", ",a:1"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_new_connections_go_to_the_least_loaded_ready_link():
    pool = pool_of(2)
    a, b = pool.links
    come_up(a)
    conns = [pool.open(FakeLink(), pb.RelayOpen()) for _ in range(3)]
    assert [pool.carrier(c) for c in conns] == [a, a, a]  # b is not up: nothing goes there
    come_up(b)
    more = [pool.open(FakeLink(), pb.RelayOpen()) for _ in range(5)]
    assert [pool.carrier(c) for c in more] == [b, b, b, a, b]  # ties: the first link
    assert len(a) == 4 and len(b) == 4
    assert len(set(conns + more)) == 8  # one numbering across the links
    pool.close(more[0], end_session=True)
    assert len(pool) == 7 and pool.carrier(more[0]) is None


def test_a_failed_links_connections_move_to_a_ready_one_with_their_queued_frames():
    pool = pool_of(2)
    a, b = pool.links
    come_up(a)
    come_up(b)
    links = [FakeLink(session=f"s{i}") for i in range(4)]
    conns = [pool.open(link, pb.RelayOpen()) for link in links]
    on_a = [c for c in conns if pool.carrier(c) is a]
    assert on_a and len(on_a) == 2
    b._batch = pb.RelayUp()  # what b had to write went out
    a._end()  # a's call failed: its links were told, and moved
    a_frame = pb.ClientFrame(cancel=pb.CancelStream(stream_id="x"))
    assert all(pool.carrier(c) is b for c in conns)
    assert len(a) == 0 and len(b) == 4 and pool.moved == 2
    assert sum(link.lost for link in links) == 2
    # each moved connection is opened on b's call by resuming its session, under its own number
    opened = [e for e in b._batch.entries if e.WhichOneof("kind") == "open"]
    assert sorted(e.conn for e in opened) == sorted(on_a)
    assert all(e.open.resume.session_id for e in opened)
    pool.send(on_a[0], a_frame)
    assert entries(b)[-1] == (on_a[0], "frame")


def test_frames_queued_while_down_follow_the_connection():
    pool = pool_of(2)
    a, b = pool.links
    come_up(a)
    link = FakeLink(session="s")
    conn = pool.open(link, pb.RelayOpen())
    a._end()  # nowhere to go: b is not up
    assert pool.carrier(conn) is a
    pool.send(conn, pb.ClientFrame(cancel=pb.CancelStream(stream_id="one")))
    pool.send(conn, pb.ClientFrame(cancel=pb.CancelStream(stream_id="two")))
    come_up(b)  # the waiting connection goes to b: opened (resume), then its frames in order
    assert pool.carrier(conn) is b and len(a) == 0
    assert entries(b) == [(conn, "open"), (conn, "frame"), (conn, "frame")]
    assert [e.frame.cancel.stream_id for e in b._batch.entries[1:]] == ["one", "two"]
    assert not entries(a)


def test_with_one_server_connections_wait_for_their_own_link():
    pool = pool_of(1)
    (a,) = pool.links
    come_up(a)
    conns = [pool.open(FakeLink(session="s"), pb.RelayOpen()) for _ in range(3)]
    assert pool.up
    a._end()
    assert not pool.up and pool.moved == 0
    assert all(pool.carrier(c) is a for c in conns)
    come_up(a)  # the same link's new call re-opens them all
    assert [k for _, k in entries(a)] == ["open"] * 3


def test_ready_while_any_link_is_up():
    pool = pool_of(2)
    a, b = pool.links
    assert not pool.up and not pool.opened.is_set()
    come_up(b)
    assert pool.up and pool.opened.is_set() and pool.channel() is b.channel
    b._end()
    assert not pool.up
