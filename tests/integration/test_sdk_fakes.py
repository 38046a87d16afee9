"""The official SDKs read the fakes: this is what proves the fakes speak each provider's wire
format (and so that the driver tests against them mean something)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from tests.fakes import anthropic as anthropic_fake
from tests.fakes import gemini as gemini_fake
from tests.fakes import openai as openai_fake
from tests.fakes.base import generated_tokens

OPENAI_TEXT = (
    "I'm unable to provide real-time updates, including current weather information. For the latest weather in "
    "San Francisco, I recommend checking a reliable weather website or app such as the Weather Channel, BBC Weather, "
    "or a local San Francisco news station."
)
ANTHROPIC_TEXT = "Hello there!"
GEMINI_TEXT = "The capital of Wyoming is **Cheyenne**.\n"
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


# -- OpenAI --------------------------------------------------------------------------------------


@pytest.fixture
async def clients() -> AsyncIterator[list]:
    """SDK clients made by a test, closed after it (their pools outlive the test otherwise)."""
    made: list = []
    yield made
    for client in made:
        await (client.aio.aclose() if isinstance(client, genai.Client) else client.close())


def openai_client(fake, clients) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(api_key="sk-test-key", base_url=fake.url + "/v1", max_retries=0)
    clients.append(client)
    return client


async def test_openai_sdk_reads_text_and_usage(clients):
    async with openai_fake.serve() as fake:
        stream = await openai_client(fake, clients).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "weather?"}], stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
    assert text == OPENAI_TEXT
    assert finish == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens) == (14, 47)
    assert fake.last_request.headers["authorization"] == "Bearer sk-test-key"


async def test_openai_sdk_reads_a_tool_call(clients):
    async with openai_fake.serve() as fake:
        async with openai_client(fake, clients).chat.completions.stream(
            model="gpt-4o@scenario=tool", messages=[{"role": "user", "content": "weather in NYC?"}], tools=[WEATHER_TOOL]
        ) as stream:
            final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.id == "call_4XzlGBLtUe9dy3GVNV4jhq7h"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "New York City"}
    assert final.choices[0].finish_reason == "tool_calls"


async def test_openai_sdk_reads_generated_tokens(clients):
    async with openai_fake.serve() as fake:
        stream = await openai_client(fake, clients).chat.completions.create(
            model="gpt-4o@tokens=25", messages=[{"role": "user", "content": "x"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "".join(generated_tokens(25))


async def test_openai_sdk_sees_rate_limit_and_in_stream_error(clients):
    async with openai_fake.serve() as fake:
        client = openai_client(fake, clients)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(
                model="gpt-4o@status=429,retry_after=3", messages=[{"role": "user", "content": "x"}], stream=True
            )
        assert info.value.response.headers["retry-after"] == "3"
        assert info.value.code == "rate_limit_exceeded"
        stream = await client.chat.completions.create(
            model="gpt-4o@stream_error=2", messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


async def test_openai_sdk_reads_azure_deployment_url(clients):
    async with openai_fake.serve() as fake:
        client = openai.AsyncAzureOpenAI(
            api_key="azure-key", azure_endpoint=fake.url, api_version="2024-10-21", max_retries=0
        )
        clients.append(client)
        stream = await client.chat.completions.create(
            model="my-deployment", messages=[{"role": "user", "content": "x"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == OPENAI_TEXT
    assert fake.last_request.path.startswith("/openai/deployments/my-deployment/chat/completions?api-version=")
    assert fake.last_request.headers["api-key"] == "azure-key"


# -- Anthropic -----------------------------------------------------------------------------------


def anthropic_client(fake, clients) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(api_key="sk-ant-test", base_url=fake.url, max_retries=0)
    clients.append(client)
    return client


async def test_anthropic_sdk_reads_text_and_usage(clients):
    async with anthropic_fake.serve() as fake:
        async with anthropic_client(fake, clients).messages.stream(
            model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert text == ANTHROPIC_TEXT
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 6)
    assert fake.last_request.json()["model"] == "claude-sonnet-4-5"


async def test_anthropic_sdk_reads_a_tool_use(clients):
    async with anthropic_fake.serve() as fake:
        async with anthropic_client(fake, clients).messages.stream(
            model="claude@scenario=tool", max_tokens=100, messages=[{"role": "user", "content": "weather?"}],
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
        ) as stream:
            final = await stream.get_final_message()
    tool = [b for b in final.content if b.type == "tool_use"][0]
    assert (tool.id, tool.name, tool.input) == ("toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather", {"location": "Paris"})
    assert final.stop_reason == "tool_use"


async def test_anthropic_sdk_sees_overloaded_and_in_stream_error(clients):
    async with anthropic_fake.serve() as fake:
        client = anthropic_client(fake, clients)
        with pytest.raises(anthropic.APIStatusError) as info:
            async with client.messages.stream(
                model="claude@status=529", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                await stream.get_final_message()
        assert info.value.status_code == 529
        assert info.value.body["error"]["type"] == "overloaded_error"
        with pytest.raises(anthropic.APIError):
            async with client.messages.stream(
                model="claude@stream_error=1", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                await stream.get_final_message()


# -- Gemini --------------------------------------------------------------------------------------


def gemini_client(fake, clients) -> genai.Client:
    client = genai.Client(api_key="gemini-test-key", http_options=genai_types.HttpOptions(base_url=fake.url))
    clients.append(client)
    return client


@pytest.mark.parametrize("crlf", [False, True])
async def test_gemini_sdk_reads_text_and_usage(crlf, clients):
    knobs = "@crlf" if crlf else ""
    async with gemini_fake.serve() as fake:
        text, usage, finish = "", None, None
        async for chunk in await gemini_client(fake, clients).aio.models.generate_content_stream(
            model="gemini-2.5-flash" + knobs, contents="capital of Wyoming?"
        ):
            text += chunk.text or ""
            usage = chunk.usage_metadata
            finish = chunk.candidates[0].finish_reason or finish
    assert text == GEMINI_TEXT
    assert (usage.prompt_token_count, usage.candidates_token_count) == (7, 10)
    assert finish == genai_types.FinishReason.STOP
    assert fake.last_request.headers["x-goog-api-key"] == "gemini-test-key"
    assert fake.last_request.path.endswith(":streamGenerateContent?alt=sse")


async def test_gemini_sdk_reads_a_function_call_and_thoughts(clients):
    async with gemini_fake.serve() as fake:
        calls, thoughts = [], ""
        async for chunk in await gemini_client(fake, clients).aio.models.generate_content_stream(
            model="gemini-2.5-flash@scenario=tool", contents="days until new year?"
        ):
            calls += chunk.function_calls or []
            thoughts += "".join(p.text for p in chunk.candidates[0].content.parts if p.thought and p.text)
    assert [(c.name, c.args) for c in calls] == [("now", {})]
    assert thoughts.startswith("**Calculating the Days**")


async def test_gemini_sdk_sees_rate_limit(clients):
    async with gemini_fake.serve() as fake:
        with pytest.raises(genai.errors.ClientError) as info:
            async for _ in await gemini_client(fake, clients).aio.models.generate_content_stream(
                model="gemini-2.5-flash@status=429,retry_after=7", contents="x"
            ):
                pass
    assert info.value.code == 429
    assert info.value.status == "RESOURCE_EXHAUSTED"
