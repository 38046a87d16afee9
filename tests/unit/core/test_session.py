"""The session core, fed events directly: no sockets, no event loop, no clock."""

import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from server.core.events import Attempt, AttemptEnded, Failed, Finished, FinishReason, ReasoningDelta, Routed, TextDelta, ToolCallDelta, UsageReport
from server.core.session import CancelUpstream, Session, SessionLimits, StartUpstream
from server.core.stream import IllegalTransition
from server.errors import Overloaded, StreamCut

MS = 1_000_000  # ns


def make(max_streams=4, **limits):
    s = Session("sess", "tok", SessionLimits(max_streams=max_streams, **limits), {"demo"}, lambda: 1_700_000_000_000_000_000, 0)
    (hello,) = s.frames_to_send()
    assert hello.session.session_id == "sess" and hello.session.resume_token == "tok"
    return s


def start(session, sid="a", model="demo", now=0, **params):
    frame = pb.ClientFrame(
        start=pb.StartStream(
            stream_id=sid, model=model, messages=[pb.ChatMessage(role="user", content="hi")], params=pb.GenerationParams(**params)
        )
    )
    session.receive_frame(frame, now)


def kinds(frames):
    return [f.WhichOneof("kind") for f in frames]


def routed(session, sid="a", now=1 * MS):
    session.receive_event(sid, Routed("demo", "demo-corpus", "demo"), now)


def test_start_asks_for_upstream_and_routing_sends_started_with_seq_1():
    s = make()
    start(s)
    (action,) = s.actions_to_take()
    assert isinstance(action, StartUpstream) and action.stream_id == "a" and action.request.model == "demo"
    assert s.frames_to_send() == []
    routed(s)
    (frame,) = s.frames_to_send()
    assert frame.started.seq == 1 and frame.started.provider == "demo" and frame.started.latency_us == 1000


def test_tokens_get_consecutive_seq_and_latency_from_previous_token():
    s = make()
    start(s)
    routed(s)
    s.frames_to_send()
    s.receive_event("a", TextDelta("Hello"), 100 * MS)
    assert s.frames_to_send()[0].token.seq == 2
    s.receive_event("a", TextDelta(" world"), 112 * MS)
    (f,) = s.frames_to_send()
    assert (f.token.seq, f.token.text, f.token.latency_us, f.token.count) == (3, " world", 12_000, 0)


def test_tokens_queued_while_the_writer_is_busy_merge_in_order():
    s = make()
    start(s)
    routed(s)
    for i, t in enumerate(["a", "b", "c"]):
        s.receive_event("a", TextDelta(t), (10 + i) * MS)
    frames = s.frames_to_send()
    assert kinds(frames) == ["started", "token"]
    tok = frames[1].token
    assert (tok.text, tok.seq, tok.count, tok.latency_us) == ("abc", 4, 3, 10_000)
    # After a drain the next token starts a fresh frame: a lone token is never held back.
    s.receive_event("a", TextDelta("d"), 20 * MS)
    (f,) = s.frames_to_send()
    assert (f.token.text, f.token.seq, f.token.count) == ("d", 5, 0)


def test_a_non_token_frame_ends_the_merge_so_order_is_kept():
    s = make()
    start(s)
    routed(s)
    s.receive_event("a", TextDelta("x"), 2 * MS)
    s.receive_event("a", ToolCallDelta(0, "call_1", "f", ""), 3 * MS)
    s.receive_event("a", TextDelta("y"), 4 * MS)
    frames = s.frames_to_send()
    assert kinds(frames) == ["started", "token", "tool_call", "token"]
    assert [frames[1].token.seq, frames[2].tool_call.seq, frames[3].token.seq] == [2, 3, 4]


def test_streams_merge_independently():
    s = make()
    start(s, "a")
    start(s, "b")
    routed(s, "a")
    routed(s, "b")
    s.receive_event("a", TextDelta("1"), 2 * MS)
    s.receive_event("b", TextDelta("x"), 2 * MS)
    s.receive_event("a", TextDelta("2"), 3 * MS)
    frames = s.frames_to_send()
    texts = {(f.token.stream_id, f.token.text) for f in frames if f.HasField("token")}
    assert texts == {("a", "12"), ("b", "x")}


def test_finish_sends_done_with_usage_and_timing_and_frees_the_stream():
    s = make()
    start(s, now=0)
    routed(s)
    s.receive_event("a", UsageReport(prompt_tokens=5), 2 * MS)
    s.receive_event("a", TextDelta("a"), 100 * MS)
    s.receive_event("a", TextDelta("b"), 110 * MS)
    s.receive_event("a", TextDelta("c"), 130 * MS)
    s.receive_event("a", UsageReport(completion_tokens=3), 131 * MS)
    assert s.receive_event("a", Finished(FinishReason.STOP), 140 * MS) is False
    done = s.frames_to_send()[-1].done
    assert done.seq == 5 and done.finish_reason == pb.FINISH_REASON_STOP
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 3)
    assert done.timing.ttft_us == 100_000 and done.timing.total_us == 140_000 and done.timing.tokens == 3
    assert done.timing.itl_max_us == 20_000 and done.timing.itl_p50_us == 10_000
    assert done.latency_us == 10_000
    assert not s.is_live("a") and s.live_streams == 0


def test_failure_mid_stream_is_an_error_with_partial_usage_never_done():
    s = make()
    start(s)
    routed(s)
    s.receive_event("a", TextDelta("partial"), 5 * MS)
    s.receive_event("a", UsageReport(prompt_tokens=9, completion_tokens=1), 6 * MS)
    s.receive_event("a", Failed(StreamCut("the provider's stream ended early")), 7 * MS)
    frames = s.frames_to_send()
    assert "done" not in kinds(frames)
    err = frames[-1].error
    assert err.seq == 3 and err.code == pb.ERROR_CODE_UPSTREAM_ERROR and err.retryable
    assert err.usage.prompt_tokens == 9 and err.usage.completion_tokens == 1


def test_retry_after_is_carried_in_milliseconds():
    s = make()
    start(s)
    routed(s)
    s.receive_event("a", Failed(Overloaded("busy", status=529, retry_after_s=1.5)), 2 * MS)
    err = s.frames_to_send()[-1].error
    assert err.code == pb.ERROR_CODE_OVERLOADED and err.retry_after_ms == 1500


def test_cancel_ends_with_cancelled_and_cancels_upstream_others_untouched():
    s = make()
    start(s, "a")
    start(s, "b")
    s.actions_to_take()
    routed(s, "a")
    routed(s, "b")
    s.receive_frame(pb.ClientFrame(cancel=pb.CancelStream(stream_id="a")), 5 * MS)
    assert s.actions_to_take() == [CancelUpstream("a")]
    frames = s.frames_to_send()
    assert frames[-1].done.finish_reason == pb.FINISH_REASON_CANCELLED and frames[-1].done.stream_id == "a"
    assert not s.is_live("a") and s.is_live("b")
    s.receive_event("b", TextDelta("still here"), 6 * MS)
    assert s.frames_to_send()[0].token.text == "still here"


def test_rejections_carry_the_id_and_seq_0_and_change_nothing():
    s = make(max_streams=1)
    start(s, "a")
    s.actions_to_take()
    start(s, "a")  # duplicate
    start(s, "b")  # over the limit
    start(s, "c", model="nope")
    s.receive_frame(pb.ClientFrame(cancel=pb.CancelStream(stream_id="zz")), 0)
    s.receive_frame(pb.ClientFrame(), 0)
    codes = [(f.error.stream_id, f.error.seq, pb.ErrorCode.Name(f.error.code)) for f in s.frames_to_send()]
    assert codes == [
        ("a", 0, "ERROR_CODE_DUPLICATE_STREAM_ID"),
        ("b", 0, "ERROR_CODE_TOO_MANY_STREAMS"),
        ("c", 0, "ERROR_CODE_UNKNOWN_MODEL"),
        ("zz", 0, "ERROR_CODE_UNKNOWN_STREAM"),
        ("", 0, "ERROR_CODE_INVALID_REQUEST"),
    ]
    assert s.actions_to_take() == [] and s.is_live("a")


@pytest.mark.parametrize(
    "params, words",
    [
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"max_tokens": 2_000_000}, "max_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_out_of_range_parameters_are_invalid_requests(params, words):
    s = make()
    start(s, **params)
    (f,) = s.frames_to_send()
    assert f.error.code == pb.ERROR_CODE_INVALID_REQUEST and words in f.error.message


def test_bad_roles_and_empty_messages_are_rejected():
    s = make()
    s.receive_frame(pb.ClientFrame(start=pb.StartStream(stream_id="x", model="demo")), 0)
    s.receive_frame(
        pb.ClientFrame(start=pb.StartStream(stream_id="y", model="demo", messages=[pb.ChatMessage(role="robot", content="x")])), 0
    )
    msgs = [f.error.message for f in s.frames_to_send()]
    assert "at least one message" in msgs[0] and "role" in msgs[1]


def test_empty_stream_ids_are_assigned():
    s = make()
    start(s, "")
    start(s, "")
    assert [a.stream_id for a in s.actions_to_take()] == ["s1", "s2"]


def test_ping_is_answered_with_pong():
    s = make()
    s.receive_frame(pb.ClientFrame(ping=pb.Ping(nonce=42)), 0)
    (f,) = s.frames_to_send()
    assert f.pong.nonce == 42 and f.pong.server_time_us == 1_700_000_000_000_000


def test_content_before_routing_is_an_illegal_transition():
    s = make()
    start(s)
    with pytest.raises(IllegalTransition):
        s.receive_event("a", TextDelta("too early"), 0)


def test_reasoning_has_its_own_frame():
    s = make()
    start(s)
    routed(s)
    s.receive_event("a", ReasoningDelta("hmm"), 2 * MS)
    assert kinds(s.frames_to_send()) == ["started", "reasoning"]


def test_failover_reroute_before_first_token_sends_no_second_started():
    s = make()
    start(s)
    routed(s)
    s.receive_event("a", Routed("openai", "gpt", "backup"), 2 * MS)
    s.receive_event("a", TextDelta("x"), 3 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 4 * MS)
    frames = s.frames_to_send()
    assert kinds(frames) == ["started", "token", "done"]
    assert frames[-1].done.deployment == "backup"


def test_continuation_after_content_sends_a_failover_frame_and_keeps_seq():
    s = make()
    start(s)
    routed(s)
    s.receive_event("a", TextDelta("half an "), 2 * MS)
    s.receive_event("a", Attempt("anthropic", "claude", "backup"), 3 * MS)
    s.receive_event("a", Routed("anthropic", "claude", "backup"), 3 * MS)
    s.receive_event("a", TextDelta("answer"), 4 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 5 * MS)
    frames = s.frames_to_send()
    assert kinds(frames) == ["started", "token", "failover", "token", "done"]
    assert (frames[2].failover.seq, frames[2].failover.deployment) == (3, "backup")
    # attempts are counted by Attempt events (routed() feeds none): one here
    assert frames[-1].done.deployment == "backup" and frames[-1].done.timing.attempts == 1


def test_every_attempt_is_counted_and_an_error_names_the_deployment_that_failed():
    s = make()
    start(s)
    s.receive_event("a", Attempt("openai", "gpt", "primary"), 1 * MS)
    s.receive_event("a", Attempt("openai", "gpt", "backup"), 2 * MS)  # the primary never answered
    assert s.frames_to_send() == []
    s.receive_event("a", Failed(Overloaded("backup is overloaded")), 3 * MS)
    (frame,) = s.frames_to_send()
    assert frame.error.deployment == "backup" and frame.error.timing.attempts == 2


# -- the usage of each attempt (issue 19) --------------------------------------------------------


def usage_of(frame_usage):
    return (frame_usage.prompt_tokens, frame_usage.completion_tokens, frame_usage.reasoning_tokens)


def parts_of(end):
    return [(p.deployment, usage_of(p.usage)) for p in end.attempts_usage]


def cut_on_primary(s):
    """A stream cut on "primary" after 3 tokens, continuing on "backup", as the router feeds it:
    the sum of the usage so far, then the failed attempt's own part."""
    start(s)
    s.receive_event("a", Attempt("openai", "gpt", "primary"), 1 * MS)
    s.receive_event("a", Routed("openai", "gpt", "primary"), 1 * MS)
    for i, word in enumerate(["one", " two", " three"]):
        s.receive_event("a", TextDelta(word), (2 + i) * MS)
    s.receive_event("a", UsageReport(0, 3, 0), 6 * MS)
    s.receive_event("a", AttemptEnded("primary", UsageReport(0, 3, 0)), 6 * MS)
    s.receive_event("a", Attempt("anthropic", "claude", "backup"), 7 * MS)
    s.receive_event("a", Routed("anthropic", "claude", "backup"), 8 * MS)
    s.receive_event("a", TextDelta(" four"), 9 * MS)
    s.receive_event("a", TextDelta(" five"), 10 * MS)


def test_a_cut_and_continued_stream_reports_both_attempts_and_their_sum():
    s = make()
    cut_on_primary(s)
    s.receive_event("a", UsageReport(12, 5, 0), 11 * MS)  # the router's sum: backup's own is 12 + 2
    s.receive_event("a", AttemptEnded("backup", UsageReport(12, 2, 0)), 11 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 11 * MS)
    done = s.frames_to_send()[-1].done
    assert parts_of(done) == [("primary", (0, 3, 0)), ("backup", (12, 2, 0))]
    assert usage_of(done.usage) == (12, 5, 0) and done.deployment == "backup"
    assert s.records()[0].completion_tokens == 5  # the request log and metrics get the sum


def test_the_sum_of_the_parts_is_the_usage_even_without_a_final_report():
    # the continuation reported no usage: the router's part counts its content events, and no
    # usage report of the sum follows it
    s = make()
    cut_on_primary(s)
    s.receive_event("a", AttemptEnded("backup", UsageReport(0, 2, 0)), 11 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 11 * MS)
    done = s.frames_to_send()[-1].done
    assert parts_of(done) == [("primary", (0, 3, 0)), ("backup", (0, 2, 0))]
    assert usage_of(done.usage) == (0, 5, 0)


def test_a_continuation_cancelled_before_its_usage_counts_the_tokens_it_relayed():
    s = make()
    cut_on_primary(s)
    s.receive_frame(pb.ClientFrame(cancel=pb.CancelStream(stream_id="a")), 11 * MS)
    done = s.frames_to_send()[-1].done
    assert done.finish_reason == pb.FINISH_REASON_CANCELLED
    assert parts_of(done) == [("primary", (0, 3, 0)), ("backup", (0, 2, 0))]
    assert usage_of(done.usage) == (0, 5, 0)


def test_a_failed_continuation_ends_with_an_error_that_has_both_parts():
    s = make()
    cut_on_primary(s)
    s.receive_event("a", UsageReport(0, 5, 0), 11 * MS)
    s.receive_event("a", AttemptEnded("backup", UsageReport(0, 2, 0)), 11 * MS)
    s.receive_event("a", Failed(StreamCut("cut again")), 11 * MS)
    error = s.frames_to_send()[-1].error
    assert error.seq > 0 and error.deployment == "backup"
    assert parts_of(error) == [("primary", (0, 3, 0)), ("backup", (0, 2, 0))]
    assert usage_of(error.usage) == (0, 5, 0)


def test_a_stream_served_by_one_attempt_has_one_part_equal_to_its_usage():
    s = make()
    start(s)
    routed(s)
    s.receive_event("a", TextDelta("x"), 2 * MS)
    s.receive_event("a", UsageReport(4, 1, 0), 3 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 3 * MS)
    done = s.frames_to_send()[-1].done
    assert parts_of(done) == [("demo", (4, 1, 0))] and usage_of(done.usage) == (4, 1, 0)


def test_a_stream_that_never_answered_has_no_parts():
    s = make()
    start(s)
    s.receive_event("a", Attempt("openai", "gpt", "primary"), 1 * MS)
    s.receive_event("a", Failed(Overloaded("busy")), 2 * MS)
    error = s.frames_to_send()[-1].error
    assert list(error.attempts_usage) == [] and usage_of(error.usage) == (0, 0, 0)


def test_a_modify_starts_the_parts_over():
    s = make()
    cut_on_primary(s)
    s.receive_frame(pb.ClientFrame(modify=pb.Modify(stream_id="a", append=[pb.ChatMessage(role="user", content="shorter")])), 11 * MS)
    s.receive_event("a", Attempt("openai", "gpt", "primary"), 12 * MS)
    s.receive_event("a", Routed("openai", "gpt", "primary"), 12 * MS)
    s.receive_event("a", TextDelta("ok"), 13 * MS)
    s.receive_event("a", Finished(FinishReason.STOP), 14 * MS)
    done = s.frames_to_send()[-1].done
    assert parts_of(done) == [("primary", (0, 1, 0))] and usage_of(done.usage) == (0, 1, 0)


def test_fail_all_fails_every_live_stream_cancels_upstream_and_closes():
    from server.errors import Unauthenticated

    s = make()
    start(s, "a")
    start(s, "b")
    routed(s, "a")
    s.receive_event("a", TextDelta("x"), 2 * MS)
    s.actions_to_take()
    s.frames_to_send()
    s.fail_all(Unauthenticated("this API key was revoked"), 3 * MS)
    frames = s.frames_to_send()
    assert sorted((f.error.stream_id, f.error.code) for f in frames) == [("a", pb.ERROR_CODE_UNAUTHENTICATED), ("b", pb.ERROR_CODE_UNAUTHENTICATED)]
    assert all(f.error.seq > 0 for f in frames) and s.live_streams == 0 and s.closed
    assert sorted(a.stream_id for a in s.actions_to_take()) == ["a", "b"]


def test_tokens_of_a_generation_that_modify_abandons_are_kept_for_charging():
    s = make()
    start(s)
    routed(s)
    for i in range(5):
        s.receive_event("a", TextDelta("x"), (2 + i) * MS)
    s.receive_frame(pb.ClientFrame(modify=pb.Modify(stream_id="a", append=[pb.ChatMessage(role="user", content="more")])), 10 * MS)
    assert s.take_abandoned_tokens() == 5 and s.take_abandoned_tokens() == 0


def test_conversation_history_is_trimmed_by_characters_too():
    from server.core.request import ChatMessage
    from server.core.session import _trim

    history = [ChatMessage("system", "s" * 10), *(ChatMessage("user", "x" * 100) for _ in range(10))]
    kept = _trim(history, 256, 350)
    assert kept[0].role == "system" and len(kept) == 4  # 10 + 3 * 100 <= 350
    assert len(_trim([ChatMessage("user", "y" * 1000)], 256, 10)) == 1  # the last message always stays
    assert len(_trim(history, 5, 10_000)) == 5
