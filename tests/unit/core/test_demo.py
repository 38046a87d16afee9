"""The demo provider: real corpus text, deterministic with a seed, honouring max_tokens and stop."""

import asyncio

from server.core.events import Finished, FinishReason, TextDelta, UsageReport
from server.core.request import ChatMessage, ChatRequest
from server.providers.base import DeploymentInfo
from server.providers import demo as demo_module
from server.providers.demo import DemoBackend, DemoPace, load_corpus


def backend(**pace):
    return DemoBackend(DeploymentInfo("demo", "demo", "demo-corpus"), DemoPace(**{"ttft_s": 0, "tokens_per_s": 0, **pace}), load_corpus())


def run(b, **req):
    async def go():
        return [e async for e in b.stream(ChatRequest(model="demo", messages=(ChatMessage("user", req.pop("prompt", "Explain quantum computing")),), **req))]

    return asyncio.run(go())


def text(events):
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_answers_from_the_matching_corpus_entry():
    events = run(backend(), prompt="How does photosynthesis work?")
    assert text(events).startswith("Photosynthesis is how plants")
    assert events[-1] == Finished(FinishReason.STOP)
    assert isinstance(events[0], UsageReport) and events[0].prompt_tokens > 0


def test_unknown_topics_get_the_default_answer():
    assert text(run(backend(), prompt="zzzz")).startswith("Hello! This is the llmproxy demo model.")


def test_max_tokens_truncates_with_length_and_can_exceed_one_entry():
    short = run(backend(), max_tokens=5)
    assert sum(isinstance(e, TextDelta) for e in short) == 5 and short[-1] == Finished(FinishReason.LENGTH)
    long = run(backend(), max_tokens=500)
    assert sum(isinstance(e, TextDelta) for e in long) == 500


def test_stop_sequence_cuts_before_it():
    events = run(backend(), stop=("superposition",))
    assert text(events).endswith("but a qubit can be in a ")
    assert "superposition" not in text(events)


def paced(monkeypatch, b, **req) -> tuple[str, list[float]]:
    """The text of a run and the pause before each token, as the demo asked its clock for them.

    The pauses are recorded, not waited (a fake clock), so the comparison is exact and fast."""
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay, result=None):
        pauses.append(delay)
        return await real_sleep(0, result)

    monkeypatch.setattr(demo_module.asyncio, "sleep", recording_sleep)
    try:
        events = run(b, **req)
    finally:
        monkeypatch.undo()
    return text(events), pauses


def test_seeded_pacing_is_deterministic(monkeypatch):
    b = backend(ttft_s=0.05, tokens_per_s=100, jitter=0.5, seed=7)
    first_text, first_pauses = paced(monkeypatch, b, seed=1, max_tokens=50)
    again_text, again_pauses = paced(monkeypatch, b, seed=1, max_tokens=50)
    assert (again_text, again_pauses) == (first_text, first_pauses)
    # The pauses are the time to first token, then one jittered interval per later token.
    assert first_pauses[0] == 0.05 and len(first_pauses) == 50
    assert all(0.005 <= p <= 0.015 for p in first_pauses[1:])
    assert len(set(first_pauses[1:])) > 10, "jitter 0.5 varies the interval"
    # Another seed paces the same text differently; no seed falls back to the server's --demo-seed.
    other_text, other_pauses = paced(monkeypatch, b, seed=2, max_tokens=50)
    assert other_text == first_text and other_pauses != first_pauses
    assert paced(monkeypatch, b, max_tokens=50) == paced(monkeypatch, b, max_tokens=50) == paced(monkeypatch, b, seed=7, max_tokens=50)


def test_demo_answers_are_capped_whatever_max_tokens_asks():
    events = run(backend(max_tokens=300), max_tokens=1_000_000)
    assert sum(isinstance(e, TextDelta) for e in events) == 300 and events[-1] == Finished(FinishReason.LENGTH)


def test_a_stop_sequence_spanning_several_tokens_is_found_from_the_kept_tail():
    full = text(run(backend(), max_tokens=400))
    for stop in (full[101:140], full[250:251], full[300:302]):
        got = text(run(backend(), max_tokens=400, stop=("never-there", stop)))
        # tokens already sent stay sent: the answer ends inside the stop, never past its start's token
        at = full.index(stop)
        assert full.startswith(got) and stop not in got and at <= len(got) < at + len(stop), stop


def test_stop_matching_costs_the_same_per_token_however_long_the_answer():
    import time

    stops = tuple(f"{i:x}" * 256 for i in range(16))  # the longest stops allowed, never matching

    def per_token(n):
        started = time.perf_counter()
        run(backend(max_tokens=n), max_tokens=n, stop=stops)
        return (time.perf_counter() - started) / n

    per_token(200)  # warm up
    short, long = min(per_token(500) for _ in range(3)), min(per_token(4000) for _ in range(3))
    assert long < short * 3, (short, long)  # quadratic matching made this ~8x
