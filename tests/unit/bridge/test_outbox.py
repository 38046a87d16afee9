"""The per-connection outbox: order kept, tokens of one stream merged, bytes accounted."""

from __future__ import annotations

import orjson

from bridge.outbox import Outbox
from llmproxy.v1 import llmproxy_pb2 as pb


def token(sid: str, seq: int, text: str) -> pb.ServerFrame:
    return pb.ServerFrame(token=pb.TokenDelta(stream_id=sid, seq=seq, text=text, latency_us=1000))


def test_tokens_of_one_stream_merge_until_another_frame_of_that_stream():
    box = Outbox()
    box.push(token("a", 2, "Hel"))
    box.push(token("b", 2, "x"))
    box.push(token("a", 3, "lo"))
    box.push(pb.ServerFrame(done=pb.StreamDone(stream_id="a", seq=4)))
    box.push(token("b", 3, "y"))
    frames = [orjson.loads(d) for d in box.take()]
    assert [(f["type"], f["id"], f.get("token"), f.get("seq"), f.get("count", 1)) for f in frames] == [
        ("token", "a", "Hello", 3, 2),
        ("token", "b", "xy", 3, 2),
        ("done", "a", "", 4, 1),
    ]
    assert not box and box.pending_bytes == 0


def test_a_merge_ends_at_take_and_counts_bytes():
    box = Outbox()
    box.push(token("a", 1, "x" * 100))
    assert box.pending_bytes >= 100
    assert len(box.take()) == 1
    box.push(token("a", 2, "y"))
    assert orjson.loads(box.take()[0])["token"] == "y"  # a new frame, not the old one again


def test_frames_without_a_stream_and_bridge_frames_keep_their_place():
    box = Outbox()
    box.push(token("a", 1, "1"))
    box.push(pb.ServerFrame(pong=pb.Pong(nonce=3)))
    box.push_encoded(b'{"type":"error"}')
    box.push(token("a", 2, "2"))
    kinds = [orjson.loads(d)["type"] for d in box.take()]
    assert kinds == ["token", "pong", "error"]  # the second token joined the first
