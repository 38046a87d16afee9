"""The recorder and the stored form: what is kept, and that a replay gives the same frames."""

from __future__ import annotations

from llmproxy.v1 import llmproxy_pb2 as pb
from server.cache.cli import main as cli
from server.cache.recording import CachedAnswer, Phase, Recorder
from server.cache.store import SqliteStore, StoredEntry
from server.core.events import (
    Attempt,
    Failed,
    Finished,
    FinishReason,
    ReasoningDelta,
    Routed,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from server.core.session import Session, SessionLimits
from server.errors import StreamCut

MS = 1_000_000
ANSWER = [
    ReasoningDelta("think "),
    ReasoningDelta("hard"),
    TextDelta("Hel"),
    TextDelta("lo"),
    ToolCallDelta(0, "call_1", "lookup", '{"q":'),
    ToolCallDelta(0, "", "", '"x"}'),
    UsageReport(7, 5, 2, 3, 1),
    Finished(FinishReason.TOOL_CALLS),
]


def record(events, start_ns=0, step_ns=10 * MS) -> Recorder:
    recorder = Recorder(start_ns)
    recorder.receive(Attempt("fake", "m-up", "m-1"), start_ns)
    recorder.receive(Routed("fake", "m-up", "m-1"), start_ns)
    for i, event in enumerate(events, 1):
        recorder.receive(event, start_ns + i * step_ns)
    return recorder


def test_a_normal_finish_is_recorded_with_reasoning_tool_calls_usage_and_gaps():
    answer = record(ANSWER).answer("prompt")
    assert answer is not None
    assert [e for _, e in answer.events] == ANSWER
    assert [gap for gap, _ in answer.events] == [10_000] * len(ANSWER)
    assert CachedAnswer.from_bytes(answer.to_bytes()) == answer
    assert answer.has_tool_calls


def test_failed_cut_and_stitched_answers_are_not_recorded():
    failed = record([TextDelta("a"), Failed(StreamCut("cut"))])
    assert failed.phase is Phase.SPOILED and failed.answer() is None
    cut = record([TextDelta("a"), TextDelta("b")])  # the source ended without a finish event
    assert cut.answer() is None
    stitched = record([TextDelta("a"), Routed("fake", "m-up", "m-2"), TextDelta("b"), Finished(FinishReason.STOP)])
    assert stitched.answer() is None  # continued on another deployment mid-answer


def run_session(events, routed: Routed) -> list[pb.ServerFrame]:
    session = Session("sess", "tok", SessionLimits(), {"m"}, lambda: 0, 0)
    start = pb.StartStream(stream_id="s", model="m", messages=[pb.ChatMessage(role="user", content="hi")])
    session.receive_frame(pb.ClientFrame(start=start), 0)
    session.frames_to_send()
    frames = []
    session.receive_event("s", routed, 1 * MS)
    for i, event in enumerate(events, 2):
        session.receive_event("s", event, i * MS)
        frames += session.frames_to_send()  # the writer drains each event: no merging
    return frames


def test_the_session_flags_a_replay_in_started_and_done_and_nothing_else_differs():
    live = run_session(ANSWER, Routed("fake", "m-up", "m-1"))
    replay = run_session(ANSWER, Routed("fake", "m-up", "m-1", cache="semantic", cache_score=0.97, cache_saved_us=80_000))
    assert replay[0].started.cache.kind == "semantic" and abs(replay[0].started.cache.score - 0.97) < 1e-9
    assert not live[0].started.HasField("cache")
    done = replay[-1].done
    assert done.cache.kind == "semantic" and done.usage.cached
    assert (done.usage.cached_input_tokens, done.usage.cache_write_input_tokens) == (3, 1)
    for frames in (live, replay):
        frames[0].started.ClearField("cache")
        frames[-1].done.ClearField("cache")
        frames[-1].done.usage.cached = False
    assert live == replay


def test_the_cli_deletes_a_tenants_entries(tmp_path, capsys):
    db = str(tmp_path / "cache.sqlite3")
    store = SqliteStore(db)
    for key, tenant, model in (("a", "k1", "m"), ("b", "k1", "n"), ("c", "k2", "m"), ("d", "", "m")):
        store.put(StoredEntry(key, tenant, model, "", b"x", (), 1e12), 0.0)
    store.close()
    assert cli(["delete", "--db", db, "--client", "k1", "--model", "m"]) == 0
    assert "deleted 1 entries" in capsys.readouterr().out
    cli(["delete", "--db", db, "--open"])
    assert "deleted 1 entries" in capsys.readouterr().out
    cli(["stats", "--db", db])
    assert "entries 2" in capsys.readouterr().out


def test_a_failover_before_content_records_the_attempt_that_answered():
    recorder = Recorder(0)
    recorder.receive(Routed("fake", "up-a", "a"), 0)
    recorder.receive(UsageReport(3, 0), 1 * MS)
    recorder.receive(Routed("fake", "up-b", "b"), 2 * MS)  # a failover before any content
    recorder.receive(TextDelta("x"), 5 * MS)
    recorder.receive(Finished(FinishReason.STOP), 6 * MS)
    answer = recorder.answer()
    assert answer is not None and answer.deployment == "b"
    assert answer.events == ((3000, TextDelta("x")), (1000, Finished(FinishReason.STOP)))
