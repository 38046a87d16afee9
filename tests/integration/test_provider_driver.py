"""HttpBackend (the one streaming driver) against each fake provider, over real sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from server.core.events import Finished, FinishReason, ReasoningDelta, TextDelta, ToolCallDelta, UsageReport
from server.core.request import ChatMessage, ChatRequest, ToolSpec
from server.errors import (
    ContentFiltered,
    ContextLengthExceeded,
    MalformedStream,
    Overloaded,
    ProxyError,
    RateLimited,
    StreamCut,
    UpstreamInvalidRequest,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnauthenticated,
)
from server.providers.adapter import Endpoint, Secret, Timeouts
from server.providers.base import DeploymentInfo
from server.providers.http import ClientPool, HttpBackend, HttpSettings
from server.providers.registry import providers
from tests.fakes import anthropic as anthropic_fake
from tests.fakes import gemini as gemini_fake
from tests.fakes import openai as openai_fake
from tests.fakes.base import FakeServer, generated_tokens

SECRET = "sk-SECRETKEY0123456789abcdef"
FAKES = {"openai": openai_fake, "anthropic": anthropic_fake, "gemini": gemini_fake}
BASE_PATH = {"openai": "/v1", "anthropic": "/v1", "gemini": "/v1beta"}
TEXT = {
    "openai": "I'm unable to provide real-time updates, including current weather information.",
    "anthropic": "Hello there!",
    "gemini": "The capital of Wyoming is **Cheyenne**.\n",
}
FAST = Timeouts(connect_s=2.0, first_token_s=5.0, stall_s=5.0)
TOOL = ToolSpec("get_weather", "Weather of a city", '{"type": "object", "properties": {"city": {"type": "string"}}}')


def ask(model: str = "m", **kw) -> ChatRequest:
    return ChatRequest(model=model, messages=(ChatMessage("user", "What is the weather?"),), **kw)


@pytest.fixture(params=["native", "aiohttp", "httpx"])
async def pool(request) -> AsyncIterator[ClientPool]:
    p = ClientPool(HttpSettings(transport=request.param))
    yield p
    await p.aclose()


@pytest.fixture
async def default_pool() -> AsyncIterator[ClientPool]:
    p = ClientPool(HttpSettings())  # the native transport
    yield p
    await p.aclose()


def backend(provider: str, fake: FakeServer, pool: ClientPool, model: str, timeouts: Timeouts = FAST, key: str = SECRET) -> HttpBackend:
    registry = providers()
    endpoint = Endpoint(provider, model, fake.url + BASE_PATH[provider], Secret(key), timeouts=timeouts)
    return HttpBackend(DeploymentInfo("d", provider, model), registry[provider].adapter, endpoint, pool)


async def run(b: HttpBackend, request: ChatRequest | None = None) -> tuple[list, ProxyError | None]:
    events: list = []
    try:
        async with aclosing(b.stream(request or ask())) as stream:
            async for event in stream:
                events.append(event)
    except ProxyError as exc:
        return events, exc
    return events, None


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# -- answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", FAKES)
async def test_text_usage_and_finish(provider, pool):
    async with FAKES[provider].serve() as fake:
        events, error = await run(backend(provider, fake, pool, "some-model"))
    assert error is None
    assert text_of(events).startswith(TEXT[provider])
    assert events[-1] == Finished(FinishReason.STOP)
    usage = [e for e in events if isinstance(e, UsageReport)]
    assert usage and max(u.completion_tokens for u in usage) > 0 and max(u.prompt_tokens for u in usage) > 0


@pytest.mark.parametrize("provider", FAKES)
async def test_generated_tokens_arrive_one_by_one(provider, default_pool):
    async with FAKES[provider].serve() as fake:
        events, error = await run(backend(provider, fake, default_pool, "m@tokens=200"))
    assert error is None
    assert [e.text for e in events if isinstance(e, TextDelta)] == generated_tokens(200)


async def test_openai_tool_call_is_normalized(default_pool):
    async with openai_fake.serve() as fake:
        events, error = await run(backend("openai", fake, default_pool, "gpt-4o@scenario=tool"), ask(tools=(TOOL,)))
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert error is None
    assert calls[0] == ToolCallDelta(0, "call_4XzlGBLtUe9dy3GVNV4jhq7h", "get_weather", "")
    assert all(c.id == "" and c.name == "" and c.arguments for c in calls[1:])
    assert "".join(c.arguments for c in calls) == '{"city":"New York City"}'
    assert events[-1] == Finished(FinishReason.TOOL_CALLS)
    body = fake.last_request.json()
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "gpt-4o@scenario=tool"
    assert fake.last_request.headers["authorization"] == f"Bearer {SECRET}"


async def test_anthropic_tool_use_is_normalized(default_pool):
    async with anthropic_fake.serve() as fake:
        events, error = await run(backend("anthropic", fake, default_pool, "claude@scenario=tool"), ask(tools=(TOOL,)))
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert error is None
    assert text_of(events) == "I'll check the current weather in Paris for you."
    assert calls[0] == ToolCallDelta(0, "toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather", "")
    assert "".join(c.arguments for c in calls) == '{"location": "Paris"}'
    assert events[-1] == Finished(FinishReason.TOOL_CALLS)
    assert fake.last_request.headers["x-api-key"] == SECRET
    assert fake.last_request.headers["anthropic-version"] == "2023-06-01"


async def test_gemini_function_call_and_thoughts(default_pool):
    async with gemini_fake.serve() as fake:
        events, error = await run(backend("gemini", fake, default_pool, "gemini-2.5-flash@scenario=tool"), ask(tools=(TOOL,)))
    assert error is None
    assert [e for e in events if isinstance(e, ToolCallDelta)] == [ToolCallDelta(0, "call_0", "now", "{}")]
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)).startswith("**Calculating the Days**")
    assert events[-1] == Finished(FinishReason.TOOL_CALLS)
    usage = [e for e in events if isinstance(e, UsageReport)][-1]
    assert usage == UsageReport(prompt_tokens=38, completion_tokens=6 + 168, reasoning_tokens=168)
    assert fake.last_request.headers["x-goog-api-key"] == SECRET
    assert fake.last_request.path.startswith("/v1beta/models/gemini-2.5-flash@scenario=tool:streamGenerateContent?alt=sse")


async def test_gemini_crlf_and_split_chunks(default_pool):
    async with gemini_fake.serve() as fake:
        events, error = await run(backend("gemini", fake, default_pool, "g@crlf,split=7"))
    assert error is None and text_of(events) == TEXT["gemini"]


async def test_keep_alive_reuses_the_connection(pool):
    async with openai_fake.serve() as fake:
        b = backend("openai", fake, pool, "m")
        for _ in range(3):
            _, error = await run(b)
            assert error is None
    assert fake.connections == 1


# -- failures ------------------------------------------------------------------------------------

FAILURES = [
    ("openai", "status=429,retry_after=2", RateLimited, 2.0),
    ("openai", "status=429,retry_after_ms=1500", RateLimited, 1.5),
    ("openai", "status=429,code=insufficient_quota", UpstreamUnauthenticated, None),
    ("openai", "status=500", UpstreamServerError, None),
    ("openai", "status=503", Overloaded, None),
    ("openai", "status=401", UpstreamUnauthenticated, None),
    ("openai", "status=400", UpstreamInvalidRequest, None),
    ("openai", "status=400,code=context_length_exceeded", ContextLengthExceeded, None),
    ("openai", "status=400,code=content_filter", ContentFiltered, None),
    ("openai", "stream_error=2", UpstreamServerError, None),
    ("anthropic", "status=429,retry_after=4", RateLimited, 4.0),
    ("anthropic", "status=500", UpstreamServerError, None),
    ("anthropic", "status=503", Overloaded, None),
    ("anthropic", "status=529", Overloaded, None),
    ("anthropic", "status=401", UpstreamUnauthenticated, None),
    ("anthropic", "status=400", UpstreamInvalidRequest, None),
    ("anthropic", "stream_error=1", Overloaded, None),
    ("gemini", "status=429,retry_after=7", RateLimited, 7.0),
    ("gemini", "status=500", UpstreamServerError, None),
    ("gemini", "status=503", Overloaded, None),
    ("gemini", "status=400,code=API_KEY_INVALID", UpstreamUnauthenticated, None),
    ("gemini", "status=400", UpstreamInvalidRequest, None),
    ("gemini", "stream_error=1", Overloaded, None),
]
for _provider in FAKES:
    FAILURES += [
        (_provider, "cut=2", StreamCut, None),
        (_provider, "reset=2", StreamCut, None),
        (_provider, "malformed=1", MalformedStream, None),
    ]


@pytest.mark.parametrize(("provider", "knobs", "error_type", "retry_after"), FAILURES)
async def test_failure_knob_gives_typed_error(provider, knobs, error_type, retry_after, default_pool):
    async with FAKES[provider].serve() as fake:
        events, error = await run(backend(provider, fake, default_pool, f"m@{knobs}"))
    assert type(error) is error_type, (error, events)
    assert not any(isinstance(e, Finished) for e in events)
    if retry_after is not None:
        assert error.retry_after_s == pytest.approx(retry_after)
    assert SECRET not in str(error) and SECRET not in error.body and SECRET not in error.message


@pytest.mark.parametrize("provider", FAKES)
async def test_an_answer_whose_end_was_signalled_finishes_without_the_end_event(provider, pool):
    # finish_reason + usage / message_delta stop_reason + usage / finishReason, no [DONE] or
    # message_stop: finished, not cut (and not to be continued)
    async with FAKES[provider].serve() as fake:
        events, error = await run(backend(provider, fake, pool, "m@tokens=5,no_done"))
    assert error is None and isinstance(events[-1], Finished)
    assert [e.text for e in events if isinstance(e, TextDelta)] == generated_tokens(5)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_stall_after_the_signalled_end_finishes_instead_of_timing_out(provider, pool):
    async with FAKES[provider].serve() as fake:
        events, error = await run(backend(provider, fake, pool, "m@tokens=5,no_done,hold_end", timeouts=Timeouts(stall_s=0.3)))
    assert error is None and isinstance(events[-1], Finished)


@pytest.mark.parametrize("provider", FAKES)
async def test_cut_stream_keeps_the_tokens_and_usage_before_it(provider, pool):
    async with FAKES[provider].serve() as fake:
        events, error = await run(backend(provider, fake, pool, "m@tokens=10,cut=5"))
    assert isinstance(error, StreamCut)
    assert [e.text for e in events if isinstance(e, TextDelta)] == generated_tokens(5)
    if provider != "openai":  # OpenAI sends usage only in its last chunk
        assert any(isinstance(e, UsageReport) for e in events)


async def test_first_token_timeout(pool):
    async with openai_fake.serve() as fake:
        t0 = time.monotonic()
        events, error = await run(backend("openai", fake, pool, "m@ttft=3", Timeouts(2.0, 0.3, 5.0)))
    assert isinstance(error, UpstreamTimeout) and "no token within" in error.message
    assert 0.25 < time.monotonic() - t0 < 2.0


async def test_stall_timeout_after_tokens_flowed(pool):
    async with openai_fake.serve() as fake:
        t0 = time.monotonic()
        events, error = await run(backend("openai", fake, pool, "m@tokens=20,stall=3", Timeouts(2.0, 5.0, 0.3)))
    assert isinstance(error, UpstreamTimeout) and "stalled" in error.message
    assert len([e for e in events if isinstance(e, TextDelta)]) == 3
    assert 0.25 < time.monotonic() - t0 < 2.0


async def test_slow_but_steady_stream_is_not_a_stall(default_pool):
    async with anthropic_fake.serve() as fake:
        events, error = await run(backend("anthropic", fake, default_pool, "m@tokens=8,ttft=0.2,pace=0.1", Timeouts(2.0, 0.5, 0.3)))
    assert error is None and len(text_of(events)) > 0


async def test_slow_consumer_is_not_a_stall(default_pool):
    async with openai_fake.serve() as fake:
        b = backend("openai", fake, default_pool, "m@tokens=3", Timeouts(2.0, 0.3, 0.2))
        events = []
        async with aclosing(b.stream(ask())) as stream:
            async for event in stream:
                events.append(event)
                await asyncio.sleep(0.25)  # backpressure: longer than stall_s at every token
    assert events[-1] == Finished(FinishReason.STOP)


async def test_unreachable_upstream_is_an_upstream_error(pool):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = Endpoint("openai", "m", f"http://127.0.0.1:{port}/v1", Secret(SECRET), timeouts=FAST)
    b = HttpBackend(DeploymentInfo("d", "openai", "m"), providers()["openai"].adapter, endpoint, pool)
    _, error = await run(b)
    assert isinstance(error, UpstreamServerError) and SECRET not in str(error)


# -- cancellation --------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", FAKES)
@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_cancel_closes_the_upstream_within_100ms(provider, how, pool):
    async with FAKES[provider].serve() as fake:
        b = backend(provider, fake, pool, "m@tokens=1000,pace=0.01")
        got_three = asyncio.Event()

        async def consume() -> None:
            n = 0
            async with aclosing(b.stream(ask())) as stream:
                async for event in stream:
                    n += isinstance(event, TextDelta)
                    if n == 3:
                        got_three.set()
                        if how == "aclose":
                            return

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_three.wait(), 5)
        if how == "cancel":
            await asyncio.sleep(0.005)
            task.cancel()
        t0 = time.monotonic()
        await asyncio.gather(task, return_exceptions=True)
        t1 = await fake.wait_disconnect(2.0)
        assert t1 - t0 < 0.1, f"the fake saw the disconnect {1000 * (t1 - t0):.0f} ms after the cancel"
        assert fake.completed == 0


async def test_cancel_during_first_token_wait(default_pool):
    async with openai_fake.serve() as fake:
        b = backend("openai", fake, default_pool, "m@ttft=5")

        async def consume() -> None:
            async with aclosing(b.stream(ask())) as stream:
                async for _ in stream:
                    pass

        task = asyncio.create_task(consume())
        # Cancelled while it waits for the first token: once the upstream has the request.
        deadline = time.monotonic() + 5
        while not fake.requests:
            assert time.monotonic() < deadline, "the request never reached the fake"
            await asyncio.sleep(0.005)
        assert not task.done()
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await fake.wait_disconnect(2.0) - t0 < 0.1


# -- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", FAKES)
async def test_key_never_in_errors_or_reprs(provider, default_pool):
    async with FAKES[provider].serve() as fake:
        b = backend(provider, fake, default_pool, "m@status=401")
        _, error = await run(b)
    assert isinstance(error, UpstreamUnauthenticated)
    for text in (str(error), repr(error), error.body, error.message, repr(b.endpoint), str(b.endpoint.key)):
        assert SECRET not in text
