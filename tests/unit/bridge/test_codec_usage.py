"""The bridge's `done` and `error` frames: the usage of each attempt only when there are several."""

from __future__ import annotations

import orjson

from bridge.codec import encode_server_frame
from llmproxy.v1 import llmproxy_pb2 as pb


def part(deployment: str, prompt: int, completion: int) -> pb.AttemptUsage:
    return pb.AttemptUsage(deployment=deployment, usage=pb.Usage(prompt_tokens=prompt, completion_tokens=completion))


def test_a_done_served_by_one_attempt_stays_small():
    frame = pb.ServerFrame(done=pb.StreamDone(stream_id="s", seq=9, usage=pb.Usage(completion_tokens=7), attempts_usage=[part("a", 3, 7)]))
    out = orjson.loads(encode_server_frame(frame))
    assert out["type"] == "done" and out["usage"]["completion_tokens"] == 7 and "attempts" not in out


def test_a_continued_done_names_both_parts():
    done = pb.StreamDone(
        stream_id="s", seq=70, deployment="b", usage=pb.Usage(prompt_tokens=60, completion_tokens=60),
        attempts_usage=[part("a", 0, 40), part("b", 60, 20)],
    )
    out = orjson.loads(encode_server_frame(pb.ServerFrame(done=done)))
    zero = {"reasoning_tokens": 0}
    assert out["attempts"] == [
        {"deployment": "a", "usage": {"prompt_tokens": 0, "completion_tokens": 40, **zero}},
        {"deployment": "b", "usage": {"prompt_tokens": 60, "completion_tokens": 20, **zero}},
    ]
    assert out["usage"]["completion_tokens"] == 60


def test_a_stream_ending_error_names_both_parts_and_a_rejection_none():
    ended = pb.StreamError(
        stream_id="s", seq=50, code=pb.ERROR_CODE_UPSTREAM_ERROR, usage=pb.Usage(completion_tokens=45),
        attempts_usage=[part("a", 0, 40), part("b", 0, 5)],
    )
    out = orjson.loads(encode_server_frame(pb.ServerFrame(error=ended)))
    assert [p["deployment"] for p in out["attempts"]] == ["a", "b"]
    rejected = pb.StreamError(stream_id="s", code=pb.ERROR_CODE_INVALID_REQUEST, attempts_usage=[part("a", 0, 1), part("b", 0, 1)])
    assert "attempts" not in orjson.loads(encode_server_frame(pb.ServerFrame(error=rejected)))
