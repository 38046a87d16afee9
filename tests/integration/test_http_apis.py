"""The bridge's HTTP APIs read by the official SDKs (openai-python, the openai npm package, anthropic): real server,
bridge and fake OpenAI upstream processes, with client keys on."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

import anthropic
import httpx
import openai
import pytest

from server.auth.limits import KeyLimits
from server.auth.store import KeyStore
from tests.support.node import run_node
from tests.support.procs import Proc, start, start_proxy

TEXT = (  # the recording's whole answer (tests/fakes/fixtures/openai_text.sse)
    "I'm unable to provide real-time updates, including current weather information. For the latest weather in "
    "San Francisco, I recommend checking a reliable weather website or app such as the Weather Channel, BBC Weather, "
    "or a local San Francisco news station."
)
MODELS = {
    "oa-text": "m",
    "oa-tool": "m@scenario=tool",
    # One model per call: after a 429 the deployment cools down for retry-after, and a request
    # that waits longer than the heartbeat interval gets its 429 in-stream, after a heartbeat.
    **{f"oa-429-{case}": f"m@status=429,retry_after=2,tag={case}" for case in ("stream", "plain", "node", "anthropic")},
    "oa-500": "m@status=500",
    "oa-midstream": "m@tokens=10,stream_error=3",
    "oa-slow": "m@ttft=1.5,tokens=3",
    "oa-long": "m@tokens=3000,pace=0.01",
}
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
ASK = [{"role": "user", "content": "What is the weather?"}]


@pytest.fixture(scope="module")
def fake():
    proc = start("fake-openai", ["tests.fakes.openai", "--port", "0"], "fake-openai listening on ")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    db = tmp_path_factory.mktemp("auth") / "keys.sqlite3"
    store = KeyStore(str(db))
    out = {"db": str(db)}
    out["all"], _ = store.create("all", KeyLimits())
    out["demo-only"], _ = store.create("demo-only", KeyLimits(models=frozenset({"demo"})))
    out["rpm"], _ = store.create("rpm", KeyLimits(rpm=2))
    store.close()
    return out


@pytest.fixture(scope="module")
def chain(fake, keys, tmp_path_factory):
    lines = ["models:"]
    for name, upstream in MODELS.items():
        lines += [f"  {name}:", "    provider: openai", f'    model: "{upstream}"', f"    base_url: http://{fake.address}/v1", "    key: env:HTTP_TEST_KEY"]
        if "status=" in upstream:  # answer the client at once: the router would wait retry-after and retry
            lines.append('    retry: {"max_attempts": 1}')
    path = tmp_path_factory.mktemp("http") / "llmproxy.yaml"
    path.write_text("\n".join(lines) + "\n")
    proxy = start_proxy(
        ("--config", str(path), "--auth-db", keys["db"], "--demo", "all-keys", "--heartbeat-interval-s", "0.3",
         "--request-log", str(path.parent / "requests.sqlite3")),
        ("--http-port", "0"),
        {"HTTP_TEST_KEY": "sk-upstream-0123456789abcdef"},
    )
    yield proxy
    proxy.stop()


@pytest.fixture
def client(chain, keys) -> openai.OpenAI:
    return openai.OpenAI(base_url=chain.api_url + "/v1", api_key=keys["all"], max_retries=0, timeout=20)


def fake_state(proc: Proc) -> dict:
    with urllib.request.urlopen(f"http://{proc.address}/_fake/state", timeout=5) as r:
        return json.loads(r.read())


# -- streaming and not ---------------------------------------------------------------------------


def test_stream_text_with_the_usage_chunk_when_asked(client):
    chunks = list(client.chat.completions.create(model="oa-text", messages=ASK, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_stream_reports_usage_even_when_not_asked(client):
    """LangChain behind a base URL never sends include_usage: usage rides the finish chunk."""
    chunks = list(client.chat.completions.create(model="oa-text", messages=ASK, stream=True))
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0].choices[0].finish_reason == "stop"
    assert with_usage[0].usage.total_tokens == with_usage[0].usage.prompt_tokens + with_usage[0].usage.completion_tokens > 0


def test_non_stream_text(client):
    completion = client.chat.completions.create(model="oa-text", messages=ASK, temperature=0.5, max_tokens=100)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == TEXT and completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0 and completion.model == "oa-text"


def test_stream_tool_call(client):
    chunks = list(client.chat.completions.create(model="oa-tool", messages=ASK, tools=[TOOL], stream=True))
    deltas = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in deltas[1:])
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "New York City"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_non_stream_tool_call_and_the_answer_round_trip(client, fake):
    completion = client.chat.completions.create(model="oa-tool", messages=ASK, tools=[TOOL], tool_choice="auto")
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls" and message.content is None
    call = message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "New York City"}
    # The SDK's own message objects go back as history, with the tool's answer.
    history = [*ASK, message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    again = client.chat.completions.create(model="oa-text", messages=history, tools=[TOOL])
    assert again.choices[0].message.content == TEXT
    sent = json.loads(fake_state(fake)["requests"][-1]["body"])
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][2]["tool_call_id"] == call.id


# -- errors --------------------------------------------------------------------------------------


def test_mid_stream_error_is_raised_by_the_sdk(client):
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model="oa-midstream", messages=ASK, stream=True):
            received.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in received)  # the tokens before the failure arrived
    assert not isinstance(info.value, openai.APIStatusError)  # an in-stream event, status 200


def test_rate_limited_is_429_with_retry_after(client):
    for stream in (True, False):
        with pytest.raises(openai.RateLimitError) as info:
            result = client.chat.completions.create(model="oa-429-stream" if stream else "oa-429-plain", messages=ASK, stream=stream)
            if stream:
                list(result)
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "2"
        assert info.value.code == "rate_limit_exceeded"


def test_the_keys_own_rate_limit_is_429_with_retry_after(chain, keys):
    c = openai.OpenAI(base_url=chain.api_url + "/v1", api_key=keys["rpm"], max_retries=0)
    for _ in range(2):
        assert c.chat.completions.create(model="oa-text", messages=ASK).choices[0].message.content == TEXT
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="oa-text", messages=ASK, stream=True)
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
    assert 0 < int(info.value.response.headers["retry-after-ms"]) <= 60_000


def test_no_key_and_a_wrong_key_are_401(chain):
    r = httpx.post(chain.api_url + "/v1/chat/completions", json={"model": "oa-text", "messages": ASK}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    c = openai.OpenAI(base_url=chain.api_url + "/v1", api_key="sk-not-a-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model="oa-text", messages=ASK, stream=True)
    assert info.value.status_code == 401


def test_a_model_the_key_may_not_use_is_403(chain, keys):
    c = openai.OpenAI(base_url=chain.api_url + "/v1", api_key=keys["demo-only"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="oa-text", messages=ASK)
    assert c.chat.completions.create(model="demo", messages=ASK, max_tokens=3).choices[0].message.content


def test_unknown_model_is_404_model_not_found(client):
    for stream in (True, False):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="no-such-model", messages=ASK, stream=stream)
        assert info.value.code == "model_not_found" and info.value.param == "model"


def test_unsupported_fields_are_400_naming_them(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="oa-text", messages=ASK, n=2)
    assert info.value.param == "n" and "'n'" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="oa-text", messages=ASK, extra_body={"frobnicate": 1})
    assert info.value.param == "frobnicate"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="oa-text", messages=[{"role": "user", "content": 7}])


def test_upstream_failure_before_output_is_5xx(client):
    for stream in (True, False):
        with pytest.raises(openai.InternalServerError) as info:
            result = client.chat.completions.create(model="oa-500", messages=ASK, stream=stream)
            if stream:
                list(result)
        assert info.value.status_code == 502 and info.value.code == "upstream_error"


def test_a_body_that_is_not_json_is_400(chain, keys):
    c = openai.OpenAI(base_url=chain.api_url + "/v1", api_key=keys["all"], max_retries=0)
    r = httpx.post(chain.api_url + "/v1/chat/completions", headers={"authorization": f"Bearer {keys['all']}"},
                   content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert c.models.list()  # the connection is still usable


# -- models --------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert set(MODELS) | {"demo", "demo-fast"} <= set(ids)
    assert client.models.retrieve("oa-text").id == "oa-text"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"


def test_models_need_a_key(chain):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=chain.api_url + "/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()


# -- transport -----------------------------------------------------------------------------------


def test_slow_first_token_gets_comment_heartbeats_and_no_buffering(chain, keys):
    body = {"model": "oa-slow", "messages": ASK, "stream": True}
    with httpx.stream("POST", chain.api_url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {keys['all']}"}, timeout=20) as r:
        assert r.status_code == 200
        assert r.headers["x-accel-buffering"] == "no" and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    first_content = next(i for i, line in enumerate(lines) if '"content":"' in line and '"content":""' not in line)
    assert any(line.startswith(":") for line in lines[:first_content]), lines[:first_content]
    assert lines[-1] == "data: [DONE]"


def test_client_that_drops_mid_stream_cancels_the_upstream_within_100ms(chain, fake, keys):
    before = len(fake_state(fake)["disconnects"])
    port = int(chain.api_url.rsplit(":", 1)[1])
    body = json.dumps({"model": "oa-long", "messages": ASK, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {keys['all']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + body)
    received = b""
    while received.count(b'"content":"') < 5:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    t_drop = time.monotonic()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        disconnects = fake_state(fake)["disconnects"]
        if len(disconnects) > before:
            break
        time.sleep(0.01)
    assert len(disconnects) > before, "the upstream never saw the disconnect"
    assert disconnects[-1] - t_drop < 0.1, f"the upstream saw the disconnect {1000 * (disconnects[-1] - t_drop):.0f} ms after the drop"


# -- the openai npm package ----------------------------------------------------------------------


def test_openai_node_sdk(chain, keys):
    r = run_node(["tests/browser/openai_node.mjs", chain.api_url, keys["all"]], 60)
    assert r["stream"]["text"] == TEXT and r["stream"]["finish"] == "stop"
    assert r["stream"]["usage"]["completion_tokens"] > 0 and r["stream"]["usage"]["prompt_tokens"] > 0
    assert r["nonStream"]["text"] == TEXT and r["nonStream"]["usage"]["total_tokens"] > 0
    assert r["toolCall"]["name"] == "get_weather" and json.loads(r["toolCall"]["arguments"]) == {"city": "New York City"}
    assert r["toolCall"]["finish"] == "tool_calls" and r["toolCall"]["id"]
    assert r["midStream"]["raised"] and r["midStream"]["text"], r["midStream"]
    assert r["rateLimited"] == {"raised": True, "name": "RateLimitError", "status": 429, "retryAfter": "2"}


# -- Anthropic Messages, with the anthropic SDK --------------------------------------------------

ANTHROPIC_TOOL = {"name": "get_weather", "description": "Weather of a city", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture
def claude(chain, keys) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=chain.api_url, api_key=keys["all"], max_retries=0, timeout=20)


def test_anthropic_sdk_streams_text(claude, fake):
    with claude.messages.stream(model="oa-text", max_tokens=100, system="Be brief.", messages=ASK) as stream:
        deltas = list(stream.text_stream)
        message = stream.get_final_message()
    assert "".join(deltas) == TEXT
    assert message.content[0].type == "text" and message.content[0].text == TEXT
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0 and message.role == "assistant"
    sent = json.loads(fake_state(fake)["requests"][-1]["body"])
    assert [m["role"] for m in sent["messages"]] == ["system", "user"] and sent["max_completion_tokens"] == 100


def test_anthropic_sdk_tool_call_stream_and_not(claude):
    with claude.messages.stream(model="oa-tool", max_tokens=100, messages=ASK, tools=[ANTHROPIC_TOOL]) as stream:
        message = stream.get_final_message()
    tool_use = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use"
    assert tool_use[0].name == "get_weather" and tool_use[0].input == {"city": "New York City"} and tool_use[0].id
    whole = claude.messages.create(model="oa-tool", max_tokens=100, messages=ASK, tools=[ANTHROPIC_TOOL])
    assert whole.stop_reason == "tool_use" and whole.content[-1].input == {"city": "New York City"}
    # The answer goes back as Anthropic blocks: tool_use from the assistant, tool_result from the user.
    history = [*ASK, {"role": "assistant", "content": [b.model_dump() for b in whole.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": whole.content[-1].id, "content": "sunny"}]}]
    again = claude.messages.create(model="oa-text", max_tokens=100, messages=history, tools=[ANTHROPIC_TOOL])
    assert again.content[0].text == TEXT


def test_anthropic_sdk_with_bearer_auth_and_errors(chain, keys):
    bearer = anthropic.Anthropic(base_url=chain.api_url, auth_token=keys["all"], max_retries=0)
    assert bearer.messages.create(model="oa-text", max_tokens=50, messages=ASK).content[0].text == TEXT
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=chain.api_url, api_key="wrong-key-0123456789", max_retries=0).messages.create(
            model="oa-text", max_tokens=50, messages=ASK)
    with pytest.raises(anthropic.NotFoundError) as info:
        bearer.messages.create(model="no-such-model", max_tokens=50, messages=ASK)
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.RateLimitError) as info:
        bearer.messages.create(model="oa-429-anthropic", max_tokens=50, messages=ASK, stream=True)
    assert info.value.response.headers["retry-after"] == "2"
    with pytest.raises(anthropic.APIStatusError) as info:  # the SDK raises on the in-stream error event
        with bearer.messages.stream(model="oa-midstream", max_tokens=50, messages=ASK) as stream:
            for _ in stream.text_stream:
                pass
    with pytest.raises(anthropic.BadRequestError) as info:
        bearer.messages.create(model="oa-text", max_tokens=50, messages=ASK, extra_body={"top_k": 5})
    assert "top_k" in info.value.message


# -- the Responses API ---------------------------------------------------------------------------


def test_vercel_ai_sdk_stream_text_over_responses_and_chat(chain, keys):
    r = run_node(["tests/browser/vercel_ai.mjs", chain.api_url, keys["all"]], 60)
    assert r["errors"] == []
    for name in ("responses", "chat"):
        assert r[name]["text"] == TEXT and r[name]["finish"] == "stop", r[name]
        assert r[name]["usage"]["outputTokens"] > 0 and r[name]["usage"]["inputTokens"] > 0
    for name in ("responsesTool", "chatTool"):
        assert r[name]["finish"] == "tool-calls", r[name]
        assert [(c["name"], c["input"]) for c in r[name]["calls"]] == [("get_weather", {"city": "New York City"})]


def test_openai_python_responses_stream(client):
    events = list(client.responses.create(model="oa-text", input="What is the weather?", instructions="Be brief.", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == TEXT
    assert events[-1].response.output_text == TEXT and events[-1].response.usage.output_tokens > 0
    tool = {"type": "function", "name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    with client.responses.stream(model="oa-tool", input=ASK, tools=[tool]) as stream:
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "New York City"}
    # The call and its output go back as input items.
    again = client.responses.create(
        model="oa-text", tools=[tool],
        input=[*ASK, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert again.output_text == TEXT


def test_responses_unsupported_fields_are_400_naming_them(client):
    for kwargs, field in (({"previous_response_id": "resp_1"}, "previous_response_id"), ({"store": True}, "store"),
                          ({"tools": [{"type": "web_search"}]}, "tools[0].type"), ({"extra_body": {"modalities": ["audio"]}}, "modalities")):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="oa-text", input="hi", stream=True, **kwargs)
        assert info.value.param == field and field.split("[")[0] in info.value.message


def test_responses_mid_stream_error(client):
    types = []
    with pytest.raises(openai.APIError):
        for event in client.responses.create(model="oa-midstream", input="hi", stream=True):
            types.append(event.type)
    assert "response.output_text.delta" in types and "response.completed" not in types


# -- analytics -----------------------------------------------------------------------------------


async def test_request_log_rows_are_labelled_by_api(chain, client, claude, keys):
    import grpc

    from llmproxy.v1 import llmproxy_pb2 as pb
    from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc

    await asyncio.to_thread(client.chat.completions.create, model="oa-text", messages=ASK)
    await asyncio.to_thread(client.responses.create, model="oa-text", input="hi")
    await asyncio.to_thread(claude.messages.create, model="oa-text", max_tokens=50, messages=ASK)
    wanted = {"openai.chat_completions", "openai.responses", "anthropic.messages"}
    async with grpc.aio.insecure_channel(chain.grpc_target) as channel:
        stub = pb_grpc.LLMProxyStub(channel)
        for _ in range(100):  # the log is written in batches
            rows = (await stub.Stats(pb.StatsRequest(group_by="api"), metadata=(("authorization", f"Bearer {keys['all']}"),))).rows
            if wanted <= {r.name for r in rows if r.streams}:
                break
            await asyncio.sleep(0.05)
    assert wanted <= {r.name for r in rows if r.streams}, [(r.name, r.streams) for r in rows]
    assert all(r.completion_tokens > 0 for r in rows if r.name in wanted)


# -- the server goes away mid-stream -------------------------------------------------------------


def test_a_stream_cut_by_the_server_going_away_is_an_error_never_a_finish(proxy_factory):
    from tests.integration.conftest import FAST_DEMO

    p = proxy_factory(server_args=FAST_DEMO, bridge_args=("--http-port", "0"))
    client = openai.OpenAI(base_url=p.api_url + "/v1", api_key="any", max_retries=0, timeout=20)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model="demo", messages=ASK, max_tokens=400, stream=True):
            received.append(chunk)
            if len(received) == 5:
                p.server.kill()
    assert len(received) >= 5 and not any(c.choices and c.choices[0].finish_reason for c in received)
    assert "unavailable" in str(info.value.body or info.value.message).lower() or "lost" in info.value.message


def test_a_body_over_the_size_limit_is_413_in_openais_shape(chain, keys):
    r = httpx.post(chain.api_url + "/v1/chat/completions", headers={"authorization": f"Bearer {keys['all']}"},
                   json={"model": "oa-text", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, timeout=20)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
