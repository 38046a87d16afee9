"""Every provider request of a key is admitted (issue 20, point 4): a start, a modify, and a
continuation the router makes after a cut, driven through `SessionRuntime` with a scripted router."""

from __future__ import annotations

import asyncio

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.events import Finished, FinishReason, Routed, TextDelta
from server.core.session import Session, SessionLimits
from server.errors import KeyRateLimited
from server.service import SessionRuntime


class ScriptedRouter:
    """Yields a first attempt's content, then a continuation's `Routed` and more content."""

    async def stream(self, request):
        yield Routed("p", "m", "d1")
        yield TextDelta("a")
        await asyncio.sleep(0)
        yield Routed("p", "m", "d2")  # the continuation on another deployment
        yield TextDelta("b")
        yield Finished(FinishReason.STOP)


def start(sid="s"):
    return pb.ClientFrame(start=pb.StartStream(stream_id=sid, model="demo", messages=[pb.ChatMessage(role="user", content="hi")]))


async def run(admit):
    session = Session("sess", "tok", SessionLimits(), {"demo"}, lambda: 0, 0)
    session.frames_to_send()
    runtime = SessionRuntime(session, ScriptedRouter())  # type: ignore[arg-type]
    runtime.admit = admit
    runtime.feed_frame(start())
    for _ in range(50):
        await asyncio.sleep(0)
        if session.live_streams == 0:
            break
    return session.frames_to_send()


def test_a_refused_continuation_ends_the_stream_with_the_refusal():
    asked = []

    def admit(frame):
        asked.append(frame.WhichOneof("kind"))
        return KeyRateLimited("this API key may start 1 streams per minute", retry_after_s=1) if len(asked) > 1 else None

    frames = asyncio.run(run(admit))
    assert asked == ["start", "modify"]  # the continuation stands as a modify of the stream
    last = frames[-1]
    assert last.WhichOneof("kind") == "error" and last.error.code == pb.ERROR_CODE_RATE_LIMITED and last.error.seq > 0
    assert "".join(f.token.text for f in frames if f.HasField("token")) == "a"


def test_an_admitted_continuation_goes_on():
    frames = asyncio.run(run(lambda frame: None))
    assert frames[-1].WhichOneof("kind") == "done"
    assert "".join(f.token.text for f in frames if f.HasField("token")) == "ab"
