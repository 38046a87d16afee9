"""The demo provider: real corpus text, deterministic with a seed, honouring max_tokens and stop."""

import asyncio

from server.core.events import Finished, FinishReason, TextDelta, UsageReport
from server.core.request import ChatMessage, ChatRequest
from server.providers.base import DeploymentInfo
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


def test_seeded_pacing_is_deterministic():
    b = backend(tokens_per_s=2000, jitter=0.5, seed=7)
    assert text(run(b, seed=1)) == text(run(b, seed=1))
