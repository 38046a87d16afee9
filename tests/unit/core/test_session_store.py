"""The session core's side of the shared store (server/store/sessions.py), fed directly:
what is written, when frames reach the client, mirrored and adopted streams, fencing."""

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.events import Finished, FinishReason, Routed, TextDelta
from server.core.request import ChatMessage, ChatRequest
from server.core.session import ForwardFrame, Session, SessionLimits, StartUpstream
from server.errors import StreamCut

MS = 1_000_000


def make(persist=True):
    s = Session("sess", "tok", SessionLimits(), {"demo"}, lambda: 0, 0)
    s.persist = persist
    s.frames_to_send()  # the `session` frame
    return s


def start(s, sid="a"):
    s.receive_frame(pb.ClientFrame(start=pb.StartStream(stream_id=sid, model="demo", messages=[pb.ChatMessage(role="user", content="hi")])), 0)


def token(sid, seq, text, count=0):
    return pb.ServerFrame(token=pb.TokenDelta(stream_id=sid, seq=seq, text=text, count=count))


def request():
    return ChatRequest("demo", (ChatMessage("user", "hi"),))


def test_a_frame_reaches_the_client_only_once_the_store_has_it():
    s = make()
    start(s)
    s.receive_event("a", Routed("demo", "demo", "demo"), 1 * MS)
    s.receive_event("a", TextDelta("Hel"), 2 * MS)
    s.receive_event("a", TextDelta("lo"), 3 * MS)  # merges into the unsent token frame
    assert s.frames_to_send() == []
    changes = s.take_changes()
    assert [st.id for st in changes.started] == ["a"]
    ((stream, frames),) = changes.frames
    assert [f.WhichOneof("kind") for f in frames] == ["started", "token"]
    assert (frames[1].token.text, frames[1].token.seq, frames[1].token.count) == ("Hello", 3, 2)
    assert not s.take_changes()  # nothing twice
    s.release(changes.frames)
    assert s.frames_to_send() == frames
    s.release(changes.frames)  # a release seen twice sends nothing twice
    assert s.frames_to_send() == []


def test_the_memory_store_sends_at_once_and_records_nothing():
    s = make(persist=False)
    start(s)
    s.receive_event("a", Routed("demo", "demo", "demo"), 1 * MS)
    assert len(s.frames_to_send()) == 1
    assert not s.take_changes()


def test_an_ended_stream_and_its_conversation_are_written():
    s = make()
    s.receive_frame(pb.ClientFrame(start=pb.StartStream(stream_id="a", model="demo", conversation="c", messages=[pb.ChatMessage(role="user", content="hi")])), 0)
    s.receive_event("a", Routed("demo", "demo", "demo"), 1 * MS)
    s.receive_event("a", TextDelta("yo"), 2 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 3 * MS)
    changes = s.take_changes()
    assert [st.id for st in changes.ended] == ["a"]
    assert [m.content for m in changes.conversations["c"]] == ["hi", "yo"]
    assert changes.frames[0][1][-1].done.seq == 3


def test_a_followed_stream_replays_then_mirrors_and_forwards_cancel():
    s = make()
    live = s.follow("b", "server-2", request(), "", [token("b", 2, "A"), token("b", 3, "B")], 0)
    assert live
    s.resume(pb.Resume(session_id="sess", resume_token="tok", streams=[pb.StreamPosition(stream_id="b", last_seq=2)]), 0)
    out = s.frames_to_send()
    assert out[0].resumed.streams[0].replayed == 1 and out[1].token.text == "B"
    assert s.receive_remote("b", token("b", 3, "B"), 1)  # already had: ignored
    assert s.receive_remote("b", token("b", 4, "C"), 1)
    assert [f.token.text for f in s.frames_to_send()] == ["C"]
    s.receive_frame(pb.ClientFrame(cancel=pb.CancelStream(stream_id="b")), 2)
    (action,) = s.actions_to_take()
    assert isinstance(action, ForwardFrame) and action.server == "server-2" and action.frame.cancel.stream_id == "b"
    done = pb.ServerFrame(done=pb.StreamDone(stream_id="b", seq=5, finish_reason=pb.FINISH_REASON_CANCELLED))
    assert not s.receive_remote("b", done, 3)
    assert s.frames_to_send() == [done]
    assert not s.take_changes()  # another server's stream is never written from here


def test_an_adopted_stream_continues_from_its_text_or_ends_with_the_partial_usage():
    frames = [
        pb.ServerFrame(started=pb.StreamStarted(stream_id="a", seq=1, deployment="demo")),
        token("a", 3, "Hello wor", count=2),
        token("a", 4, "ld"),
    ]
    s = make()
    assert s.adopt("a", request(), "", frames, 5 * MS, may_continue=True, error=StreamCut("x"))
    (action,) = s.actions_to_take()
    assert isinstance(action, StartUpstream) and action.partial == "Hello world"
    s.receive_event("a", Routed("demo", "demo", "demo"), 6 * MS)
    s.receive_event("a", TextDelta("!"), 7 * MS)
    written = s.take_changes().frames[0][1]
    assert [f.WhichOneof("kind") for f in written] == ["failover", "token"] and written[0].failover.seq == 5

    s = make()
    assert not s.adopt("a", request(), "", frames, 5 * MS, may_continue=False, error=StreamCut("the server stopped"))
    error = s.take_changes().frames[0][1][-1].error
    assert error.seq == 5 and error.usage.completion_tokens == 3 and error.retryable


def test_an_adopted_stream_with_no_answer_yet_starts_again():
    s = make()
    assert s.adopt("a", request(), "", [pb.ServerFrame(started=pb.StreamStarted(stream_id="a", seq=1))], 0, may_continue=False, error=StreamCut("x"))
    (action,) = s.actions_to_take()
    assert isinstance(action, StartUpstream) and action.partial == ""


def test_a_fenced_stream_drops_its_refused_frames_and_follows():
    s = make()
    start(s)
    s.receive_event("a", Routed("demo", "demo", "demo"), 1 * MS)
    s.take_changes()
    s.receive_event("a", TextDelta("mine"), 2 * MS)
    s.take_changes()  # seq 2: refused by the store (another server wrote seq 2)
    s.demote("a", 1)
    assert s.receive_remote("a", token("a", 2, "theirs"), 3 * MS)
    assert [f.token.text for f in s.frames_to_send() if f.HasField("token")] == ["theirs"]
