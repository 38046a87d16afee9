"""Fuzzing the bridge's JSON decoder: whatever arrives, only `FrameError` comes out."""

from __future__ import annotations

import json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.codec import FrameError, decode_client_frame
from llmproxy.v1 import llmproxy_pb2 as pb

FIELDS = ["type", "id", "model", "messages", "stream", "temperature", "top_p", "max_tokens", "stop", "seed", "tools",
          "tool_choice", "conversation", "nonce", "session_id", "resume_token", "streams", "append", "keep_partial",
          "role", "content", "name", "tool_call_id", "tool_calls", "function", "arguments", "parameters", "text"]
TYPES = ["start", "cancel", "ping", "resume", "modify", "close", "nope", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
    st.text(max_size=20), st.sampled_from(TYPES),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=25,
)
frames = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8) | st.builds(lambda t, d: {"type": t, **d}, st.sampled_from(TYPES), st.dictionaries(st.sampled_from(FIELDS), values, max_size=6))


def check(data: str | bytes) -> None:
    try:
        frame = decode_client_frame(data, 4096, max_messages=8)
    except FrameError:
        return
    assert isinstance(frame, pb.ClientFrame)
    frame.SerializeToString()  # a decoded frame is a valid proto


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_structured_frames_only_raise_frame_error(obj):
    check(json.dumps(obj))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_arbitrary_text_and_bytes_only_raise_frame_error(data):
    check(data)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=3000))
def test_deep_nesting_only_raises_frame_error(depth):
    check('{"type":"start","messages":' + "[" * depth + "]" * depth + "}")
