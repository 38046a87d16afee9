"""The bridge's relay batches: one per loop turn, but never one the server would refuse."""

from __future__ import annotations

from bridge.relay import MAX_BATCH_BYTES, RelayLink
from llmproxy.v1 import llmproxy_pb2 as pb


class FakeChannel:
    def stream_stream(self, *args, **kwargs):  # what the generated stub asks of a channel
        return lambda **kw: None


class FakeLink:
    def reopen(self) -> pb.RelayOpen:
        return pb.RelayOpen(peer="p")


def big_start(i: int) -> pb.ClientFrame:
    start = pb.StartStream(stream_id=f"s{i}", model="demo")
    start.messages.add(role="user", content="x" * 900_000)
    return pb.ClientFrame(start=start)


def test_large_client_frames_are_split_into_batches_under_the_servers_limit():
    relay = RelayLink(FakeChannel(), "t" * 32)  # type: ignore[arg-type]
    conns = [relay.open(FakeLink(), pb.RelayOpen()) for _ in range(12)]  # type: ignore[arg-type]
    for i, conn in enumerate(conns):
        relay.send(conn, big_start(i))
    batches = [*relay._full, relay._batch]
    assert len(batches) >= 3
    assert all(b.ByteSize() <= MAX_BATCH_BYTES + 1024 for b in batches)
    sent = [e.frame.start.stream_id for b in batches for e in b.entries]
    assert sent == [f"s{i}" for i in range(12)]  # every frame once, in order

    relay._begin()  # a call opens: every link is opened, then the frames queued meanwhile
    batches = [*relay._full, relay._batch]
    kinds = [e.WhichOneof("kind") for b in batches for e in b.entries]
    assert kinds == ["open"] * 12 + ["frame"] * 12
    assert all(b.ByteSize() <= MAX_BATCH_BYTES + 1024 for b in batches)
