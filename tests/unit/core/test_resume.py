"""Sessions outliving connections: replay, modify, close, heartbeats, conversations, registry."""

import itertools

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.events import Finished, FinishReason, Routed, TextDelta
from server.core.registry import SessionRegistry
from server.core.session import CancelUpstream, StartUpstream
from server.core.session_limits import SessionLimits
from tests.unit.core.test_session import MS, make, routed, start

WALL = lambda: 0  # noqa: E731


def text_of(frames):
    return "".join(f.token.text for f in frames if f.HasField("token"))


def seqs(frames):
    out = []
    for f in frames:
        kind = f.WhichOneof("kind")
        if kind in ("token", "done", "started", "error", "restarted"):
            msg = getattr(f, kind)
            first = msg.seq - max(getattr(msg, "count", 0), 1) + 1
            out.extend(range(first, msg.seq + 1))
    return out


def test_detached_streams_keep_generating_and_resume_replays_exactly_what_was_missed():
    s = make()
    start(s)
    routed(s)
    for i, t in enumerate("abc"):
        s.receive_event("a", TextDelta(t), (2 + i) * MS)
        got = s.frames_to_send()  # the client receives each token as its own frame
    assert got[-1].token.seq == 4
    s.receive_event("a", TextDelta("d"), 6 * MS)  # queued, never sent: the connection dies
    s.detach(7 * MS)
    for i, t in enumerate("efg"):
        s.receive_event("a", TextDelta(t), (8 + i) * MS)
    s.resume(pb.Resume(session_id="sess", resume_token="tok", streams=[pb.StreamPosition(stream_id="a", last_seq=4)]), 20 * MS)
    s.receive_event("a", TextDelta("h"), 21 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 22 * MS)
    frames = s.frames_to_send()
    assert frames[0].resumed.streams[0].replayed >= 1 and frames[0].resumed.streams[0].live
    assert text_of(frames) == "defgh"
    assert seqs(frames[1:]) == list(range(5, 11))  # 5..9 tokens, 10 done: no gap, no repeat


def test_resume_of_an_ended_stream_replays_its_end():
    s = make()
    start(s)
    routed(s)
    s.frames_to_send()
    s.detach(1 * MS)
    s.receive_event("a", TextDelta("x"), 2 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 3 * MS)
    s.resume(pb.Resume(streams=[pb.StreamPosition(stream_id="a", last_seq=1), pb.StreamPosition(stream_id="zz", last_seq=0)]), 4 * MS)
    frames = s.frames_to_send()
    resumed = frames[0].resumed.streams
    assert (resumed[0].known, resumed[0].live, resumed[1].known) == (True, False, False)
    assert [f.WhichOneof("kind") for f in frames[1:]] == ["token", "done"]


def test_frames_dropped_from_a_full_replay_buffer_make_that_stream_expired():
    s = make(max_replay_frames=4)
    start(s)
    routed(s)
    s.frames_to_send()
    s.detach(1 * MS)
    s.frames_to_send()
    for i in range(10):
        s.receive_event("a", TextDelta(str(i)), (2 + i) * MS)
        s._merging.clear()  # each token in its own frame, as if sent one by one before the drop
    s.resume(pb.Resume(streams=[pb.StreamPosition(stream_id="a", last_seq=1)]), 20 * MS)
    frames = s.frames_to_send()
    assert frames[-1].error.code == pb.ERROR_CODE_EXPIRED and frames[-1].error.seq == 0


def test_modify_cancels_the_generation_restarts_it_and_keeps_sequence_numbers():
    s = make()
    start(s)
    s.actions_to_take()
    routed(s)
    s.receive_event("a", TextDelta("Once upon"), 2 * MS)
    s.receive_frame(
        pb.ClientFrame(modify=pb.Modify(stream_id="a", append=[pb.ChatMessage(role="user", content="shorter")], keep_partial=True)), 3 * MS
    )
    cancel, restart = s.actions_to_take()
    assert cancel == CancelUpstream("a") and isinstance(restart, StartUpstream)
    assert [m.content for m in restart.request.messages] == ["hi", "Once upon", "shorter"]
    assert [m.role for m in restart.request.messages] == ["user", "assistant", "user"]
    s.receive_event("a", Routed("demo", "demo-corpus", "demo"), 4 * MS)
    s.receive_event("a", TextDelta("Short."), 5 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 6 * MS)
    frames = s.frames_to_send()
    assert [f.WhichOneof("kind") for f in frames] == ["started", "token", "restarted", "token", "done"]
    assert frames[2].restarted.seq == 3 and frames[2].restarted.keep_partial
    assert frames[3].token.seq == 4 and frames[4].done.seq == 5


def test_modify_of_an_unknown_stream_or_with_nothing_to_change_is_rejected():
    s = make()
    s.receive_frame(pb.ClientFrame(modify=pb.Modify(stream_id="nope", append=[pb.ChatMessage(role="user", content="x")])), 0)
    start(s)
    s.receive_frame(pb.ClientFrame(modify=pb.Modify(stream_id="a")), 0)
    codes = [f.error.code for f in s.frames_to_send()]
    assert codes == [pb.ERROR_CODE_UNKNOWN_STREAM, pb.ERROR_CODE_INVALID_REQUEST]


def test_close_cancels_every_stream_and_refuses_new_ones():
    s = make()
    start(s, "a")
    start(s, "b")
    s.actions_to_take()
    s.receive_frame(pb.ClientFrame(close=pb.Close()), 1 * MS)
    assert set(s.actions_to_take()) == {CancelUpstream("a"), CancelUpstream("b")}
    assert s.live_streams == 0 and s.closed
    start(s, "c")
    assert s.frames_to_send()[-1].error.code == pb.ERROR_CODE_INVALID_REQUEST


def test_heartbeat_only_for_streams_silent_for_the_interval():
    s = make(heartbeat_interval_s=1.0)
    start(s, "slow", now=0)
    start(s, "busy", now=0)
    routed(s, "busy")
    s.receive_event("busy", TextDelta("x"), 900 * MS)
    s.frames_to_send()
    s.tick(1_000 * MS)
    (hb,) = s.frames_to_send()
    assert hb.heartbeat.stream_id == "slow" and hb.heartbeat.idle_ms == 1000


def test_conversation_history_is_prepended_and_the_answer_appended():
    s = make()
    conv = lambda text: pb.ClientFrame(  # noqa: E731
        start=pb.StartStream(stream_id="t", model="demo", conversation="c", messages=[pb.ChatMessage(role="user", content=text)])
    )
    s.receive_frame(conv("first question"), 0)
    routed(s, "t")
    s.receive_event("t", TextDelta("first answer"), 2 * MS)
    s.receive_frame(pb.ClientFrame(cancel=pb.CancelStream(stream_id="t")), 3 * MS)  # a stop keeps the partial answer
    s.actions_to_take()
    s.receive_frame(conv("second question"), 4 * MS)
    (action,) = s.actions_to_take()
    assert [(m.role, m.content) for m in action.request.messages] == [
        ("user", "first question"),
        ("assistant", "first answer"),
        ("user", "second question"),
    ]
    assert s.summary(5 * MS).conversations[0].messages == 2


def registry(**kw):
    counter = itertools.count()
    return SessionRegistry(SessionLimits(), {"demo"}, WALL, lambda n: f"secret{next(counter)}-{n}", **kw)


def test_registry_resume_with_a_wrong_token_or_unknown_id_gets_the_same_expired_error():
    r = registry()
    old = r.create(0)
    start(old)  # not fresh: it is kept when detached
    r.detach(old, 1 * MS)
    answers = []
    for sid, token in ((old.id, "wrong"), ("unknown", old.token)):
        new = r.create(2 * MS)
        new.frames_to_send()
        assert r.resume(new, pb.Resume(session_id=sid, resume_token=token), 3 * MS) is new
        (err,) = new.frames_to_send()
        answers.append((err.error.code, err.error.message))
    assert answers[0] == answers[1] and answers[0][0] == pb.ERROR_CODE_EXPIRED
    fresh = r.create(4 * MS)
    assert r.resume(fresh, pb.Resume(session_id=old.id, resume_token=old.token), 5 * MS) is old
    assert fresh.id not in {s.id for s in r} and old.attached


def test_registry_expires_detached_sessions_after_the_grace_and_cancels_their_streams():
    r = registry(resume_grace_s=1.0)
    s = r.create(0)
    start(s)
    s.actions_to_take()
    r.detach(s, 0)
    assert r.expire(999 * MS) == []
    (gone,) = r.expire(1_000 * MS)
    assert gone is s and s.actions_to_take() == [CancelUpstream("a")] and len(r) == 0


def test_registry_evicts_the_longest_detached_session_when_full():
    r = registry(max_sessions=2)
    a, b = r.create(0), r.create(0)
    start(a)
    start(b)
    r.detach(a, 1 * MS)
    r.detach(b, 2 * MS)
    r.create(3 * MS)
    assert [s.id for s in r.expire(3 * MS)] == [a.id]


# -- hostile resumes (issue 20, point 1) ------------------------------------------------------------


def test_a_resume_naming_a_stream_twice_or_too_many_streams_is_refused_before_any_replay():
    r = registry()
    old = r.create(0)
    start(old)
    r.detach(old, 1 * MS)
    for streams in (
        [pb.StreamPosition(stream_id="a")] * 2,
        [pb.StreamPosition(stream_id=f"s{i}") for i in range(old.resume_limit() + 1)],
        [pb.StreamPosition(stream_id="x" * 500)],
    ):
        new = r.create(2 * MS)
        new.frames_to_send()
        assert r.resume(new, pb.Resume(session_id=old.id, resume_token=old.token, streams=streams), 3 * MS) is new
        (err,) = new.frames_to_send()
        assert err.error.code == pb.ERROR_CODE_INVALID_REQUEST and err.error.seq == 0
        assert not old.attached  # the session was not taken over
    ok = r.create(4 * MS)
    names = [pb.StreamPosition(stream_id=f"s{i}") for i in range(old.resume_limit())]
    assert r.resume(ok, pb.Resume(session_id=old.id, resume_token=old.token, streams=names), 5 * MS) is old


def test_a_long_replay_goes_out_in_pieces_and_live_frames_wait_behind_it():
    from server.core.session import REPLAY_FRAMES_PER_DRAIN

    s = make()
    start(s)
    routed(s)
    s.frames_to_send()
    s.detach(1 * MS)
    n = 3 * REPLAY_FRAMES_PER_DRAIN
    for i in range(n):
        s.receive_event("a", TextDelta("x"), (2 + i) * MS)
        s._merging.clear()  # each token in its own frame, as if sent one by one before the drop
    s.resume(pb.Resume(streams=[pb.StreamPosition(stream_id="a", last_seq=1)]), 10_000 * MS)
    got = []
    pieces = 0
    while s.has_output():
        frames = s.frames_to_send()
        assert len(frames) <= REPLAY_FRAMES_PER_DRAIN + 1  # + the `resumed` frame
        got.extend(frames)
        pieces += 1
        if pieces == 2:  # live tokens and the end arrive while the replay is going out
            s.receive_event("a", TextDelta("y"), 10_001 * MS)
            s.receive_event("a", TextDelta("z"), 10_002 * MS)
            s.receive_event("a", Finished(FinishReason.STOP), 10_003 * MS)
    assert pieces >= 3
    assert got[0].HasField("resumed")
    assert text_of(got) == "x" * n + "yz"
    assert seqs(got[1:]) == list(range(2, n + 5))  # no gap, no repeat, the end last
    assert not s.has_output()
