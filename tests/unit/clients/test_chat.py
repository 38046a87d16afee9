"""The terminal chat's timing (llmproxy_client.chat.TokenTimer), fed frames and times, no sockets."""

from __future__ import annotations

import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy_client.chat import TokenTimer


def token(text: str, latency_us: int) -> pb.ServerFrame:
    return pb.ServerFrame(token=pb.TokenDelta(stream_id="s", text=text, latency_us=latency_us))


def test_gaps_ttft_rate_and_finish():
    timer = TokenTimer(sent_at_s=10.0)
    assert timer.receive_frame(pb.ServerFrame(started=pb.StreamStarted(stream_id="s", deployment="d1")), 10.01) is None
    first = timer.receive_frame(token("Hel", 95_000), 10.1)
    second = timer.receive_frame(token("lo", 45_000), 10.15)
    third = timer.receive_frame(token("!", 48_000), 10.2)
    assert first is not None and second is not None and third is not None
    assert first.gap_ms == pytest.approx(100) and first.server_gap_ms == pytest.approx(95)
    assert second.gap_ms == pytest.approx(50) and third.gap_ms == pytest.approx(50)
    timer.receive_frame(pb.ServerFrame(done=pb.StreamDone(stream_id="s", finish_reason=pb.FINISH_REASON_LENGTH)), 10.21)
    summary = timer.summary(10.25)
    assert summary.tokens == 3 and summary.ttft_ms == pytest.approx(100) and summary.total_ms == pytest.approx(250)
    assert summary.tokens_per_s == pytest.approx(20)  # 2 gaps in 0.1 s after the first token
    assert summary.gap_p50_ms == pytest.approx(50) and summary.gap_max_ms == pytest.approx(50)
    assert (summary.finish, summary.deployment) == ("length", "d1")
    assert summary.line().startswith("[length · d1 · ttft 100 ms · 3 tokens · 20.0 tok/s")


def test_no_token_and_an_explicit_finish():
    timer = TokenTimer(sent_at_s=0.0)
    summary = timer.summary(0.5, "stopped")
    assert (summary.tokens, summary.ttft_ms, summary.tokens_per_s, summary.gap_p50_ms, summary.finish) == (0, None, 0.0, None, "stopped")
    assert "ttft -" in summary.line()
