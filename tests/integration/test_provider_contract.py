"""One contract, every provider, the whole chain: WebSocket -> bridge -> server -> fake upstream.

Three fake providers run as subprocesses; a config file points public models at them, one per
(provider, case), failure modes chosen through the fakes' knobs in the upstream model name. The
same cases run over each provider. The keys are recognizable fakes, and the last test scans
every log line and every frame of the module for them.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.support.procs import Proc, start
from tests.support.ws import collect, recv, send

PROVIDERS = ("openai", "anthropic", "gemini")
BASE_PATH = {"openai": "/v1", "anthropic": "/v1", "gemini": "/v1beta"}
KEYS = {p: f"sk-CONTRACT-{p}-KEY-3f9a8b7c6d5e4f3a2b1c" for p in PROVIDERS}
TEXT = {
    "openai": "I'm unable to provide real-time updates, including current weather information.",
    "anthropic": "Hello there!",
    "gemini": "The capital of Wyoming is **Cheyenne**.\n",
}
CASES = {  # public-name suffix -> upstream model (knobs after @), timeouts
    "text": ("m", None),
    "tool": ("m@scenario=tool", None),
    "long": ("m@tokens=3000,pace=0.01", None),
    "r429": ("m@status=429,retry_after=2", None),
    "r401": ("m@status=401", None),
    "r500": ("m@status=500", None),
    "r503": ("m@status=503", None),
    "cut": ("m@tokens=10,cut=5", None),
    "reset": ("m@tokens=10,reset=5", None),
    "malformed": ("m@tokens=10,malformed=3", None),
    "stall": ("m@tokens=10,stall=3", {"stall_s": 0.5}),
    "ttft": ("m@ttft=5", {"first_token_s": 0.5}),
    "stream_error": ("m@tokens=10,stream_error=3", None),
    "r529": ("m@status=529", None),
    "no_done": ("m@no_done", None),
}
FAILURES = {  # case -> the error code on the wire, per provider (None: not applicable)
    "r429": dict.fromkeys(PROVIDERS, "rate_limited"),
    "r401": dict.fromkeys(PROVIDERS, "upstream_unauthenticated"),
    "r500": dict.fromkeys(PROVIDERS, "upstream_error"),
    "r503": dict.fromkeys(PROVIDERS, "overloaded"),
    "cut": dict.fromkeys(PROVIDERS, "upstream_error"),
    "reset": dict.fromkeys(PROVIDERS, "upstream_error"),
    "malformed": dict.fromkeys(PROVIDERS, "upstream_error"),
    "stall": dict.fromkeys(PROVIDERS, "timeout"),
    "ttft": dict.fromkeys(PROVIDERS, "timeout"),
    "stream_error": {"openai": "upstream_error", "anthropic": "overloaded", "gemini": "overloaded"},
    "r529": {"openai": None, "anthropic": "overloaded", "gemini": None},
}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}}

FRAMES: list[str] = []  # every raw frame of the module, for the key scan


@pytest.fixture(scope="module")
def fakes():
    procs = {p: start(f"fake-{p}", [f"tests.fakes.{p}", "--port", "0"], f"fake-{p} listening on ") for p in PROVIDERS}
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.fixture(scope="module")
def chain(fakes, tmp_path_factory):
    from tests.support.procs import start_proxy

    lines = ["models:"]
    for p in PROVIDERS:
        for case, (model, timeouts) in CASES.items():
            lines += [f"  {p}-{case}:", f"    provider: {p}", f"    model: \"{model}\"",
                      f"    base_url: http://{fakes[p].address}{BASE_PATH[p]}", f"    key: env:CONTRACT_{p.upper()}_KEY"]
            if timeouts:
                lines.append(f"    timeouts: {json.dumps(timeouts)}")
    path = tmp_path_factory.mktemp("contract") / "llmproxy.yaml"
    path.write_text("\n".join(lines) + "\n")
    env = {f"CONTRACT_{p.upper()}_KEY": KEYS[p] for p in PROVIDERS}
    proxy = start_proxy(("--config", str(path), "--log-level", "DEBUG"), (), env)
    yield proxy
    proxy.stop()


def fake_state(proc: Proc) -> dict:
    with urllib.request.urlopen(f"http://{proc.address}/_fake/state", timeout=5) as r:
        return json.loads(r.read())


async def run_stream(chain, model: str, messages=None, **extra) -> list[dict]:
    frame = {"type": "start", "id": "s", "model": model,
             "messages": messages or [{"role": "user", "content": "What is the weather?"}], **extra}
    async with connect(chain.ws_url) as ws:
        await send(ws, frame)
        frames = (await collect(ws, {"s"}, timeout_s=20))["s"]
    FRAMES.extend(orjson.dumps({k: v for k, v in f.items() if k != "_t"}).decode() for f in frames)
    return frames


def text_of(frames) -> str:
    return "".join(f["token"] for f in frames if f["type"] == "token")


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_plain_text_with_usage(chain, provider):
    frames = await run_stream(chain, f"{provider}-text")
    assert frames[0]["type"] == "started" and frames[0]["provider"] == provider
    assert text_of(frames).startswith(TEXT[provider])
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"]["prompt_tokens"] > 0 and done["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_end_signalled_without_the_end_event_is_finished(chain, provider):
    """finish_reason + usage (OpenAI), message_delta with stop_reason + usage (Anthropic),
    finishReason (Gemini has no end event): the answer is complete without [DONE] /
    message_stop, and is reported as done, not as an error (issue 19, finding 3)."""
    frames = await run_stream(chain, f"{provider}-no_done")
    assert not any(f["type"] == "error" for f in frames)
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert text_of(frames).startswith(TEXT[provider]) and done["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_multi_turn_with_system_prompt_reaches_the_provider_mapped(chain, fakes, provider):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Weather?"},
    ]
    frames = await run_stream(chain, f"{provider}-text", messages, temperature=0.5, max_tokens=100)
    assert frames[-1]["type"] == "done"
    request = fake_state(fakes[provider])["requests"][-1]
    body = json.loads(request["body"])
    if provider == "openai":
        assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
        assert body["temperature"] == 0.5 and body["max_completion_tokens"] == 100
        assert request["headers"]["authorization"] == f"Bearer {KEYS[provider]}"
    elif provider == "anthropic":
        assert body["system"] == "You are terse." and [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert body["temperature"] == 0.5 and body["max_tokens"] == 100
        assert request["headers"]["x-api-key"] == KEYS[provider]
    else:
        assert body["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
        assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
        assert body["generationConfig"] == {"temperature": 0.5, "maxOutputTokens": 100}
        assert request["headers"]["x-goog-api-key"] == KEYS[provider]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_tool_call(chain, provider):
    frames = await run_stream(chain, f"{provider}-tool", tools=[TOOL])
    calls = [f for f in frames if f["type"] == "tool_call"]
    assert calls and calls[0]["call_id"] and calls[0]["name"] in ("get_weather", "now")
    assert all(c["call_id"] == "" and c["name"] == "" for c in calls[1:])
    json.loads("".join(c["arguments"] for c in calls))
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_cancel_closes_the_upstream(chain, fakes, provider):
    before = len(fake_state(fakes[provider])["disconnects"])
    async with connect(chain.ws_url) as ws:
        await send(ws, {"type": "start", "id": "c", "model": f"{provider}-long", "messages": [{"role": "user", "content": "go"}]})
        tokens = 0
        while tokens < 3:
            frame = await recv(ws)
            FRAMES.append(orjson.dumps(frame).decode())
            tokens += frame["type"] == "token"
        await send(ws, {"type": "cancel", "id": "c"})
        t_cancel = time.monotonic()
        while (frame := await recv(ws))["type"] != "done":
            FRAMES.append(orjson.dumps(frame).decode())
        assert frame["finish_reason"] == "cancelled"
    for _ in range(100):
        disconnects = fake_state(fakes[provider])["disconnects"]
        if len(disconnects) > before:
            break
        await asyncio.sleep(0.02)
    assert len(disconnects) > before, "the upstream never saw the disconnect"
    assert disconnects[-1] - t_cancel < 0.1, f"the upstream saw the disconnect {1000 * (disconnects[-1] - t_cancel):.0f} ms after cancel"


# Only the pairs that apply: a failure a provider cannot produce is left out, not skipped.
FAILURE_PAIRS = [(provider, case) for case, codes in FAILURES.items() for provider, code in codes.items() if code is not None]


@pytest.mark.parametrize(("provider", "case"), FAILURE_PAIRS)
async def test_failure_ends_with_a_typed_error_never_done(chain, provider, case):
    code = FAILURES[case][provider]
    frames = await run_stream(chain, f"{provider}-{case}")
    assert not any(f["type"] == "done" for f in frames)
    error = frames[-1]
    assert error["type"] == "error" and error["code"] == code, error
    if case == "r429":
        assert error.get("retry_after_ms") == 2000
    if case in ("cut", "reset", "stall", "stream_error"):  # tokens flowed before the failure
        assert text_of(frames) and "usage" in error
    if case in ("cut", "stall") and provider != "openai":  # OpenAI reports usage only at its end
        assert error["usage"]["prompt_tokens"] > 0


# The streams the key scan runs itself, so that it stands alone (`-k keys`): a success, the
# upstream refusing the key, an upstream error body, a broken stream, and an error mid-stream.
LEAK_CASES = ("text", "r401", "r500", "malformed", "stream_error")


async def test_keys_never_appear_in_logs_or_frames(chain, fakes):
    for provider in PROVIDERS:
        for case in LEAK_CASES:
            await run_stream(chain, f"{provider}-{case}")
        # The key really went upstream, so its absence below means it was kept out.
        sent = fake_state(fakes[provider])["requests"]
        assert any(KEYS[provider] in json.dumps(r["headers"]) for r in sent), f"the {provider} fake never saw the key"
    logs = chain.log_lines()
    assert any("DEBUG" in line for line in logs), "the chain logs at DEBUG: there is something to scan"
    text = "\n".join(FRAMES + logs)  # this test's frames, and every other test's of the module that ran
    for provider, key in KEYS.items():
        assert key not in text, f"the {provider} key leaked"
        assert key[-12:] not in text
