"""Provider prompt caching through the whole chain: the Anthropic stable prefix is marked
automatically when the deployment asks for it (and a client's breakpoints pass through), and
every provider's cached input tokens reach the `done` frame's usage."""

from __future__ import annotations

import json
import urllib.request

import pytest
from websockets.asyncio.client import connect

from tests.support.procs import start, start_proxy
from tests.support.ws import collect, send

PROVIDERS = ("openai", "anthropic", "gemini")
BASE_PATH = {"openai": "/v1", "anthropic": "/v1", "gemini": "/v1beta"}


@pytest.fixture(scope="module")
def fakes():
    procs = {p: start(f"fake-{p}", [f"tests.fakes.{p}", "--port", "0"], f"fake-{p} listening on ") for p in PROVIDERS}
    yield procs
    for proc in procs.values():
        proc.stop()


def deployment(fakes, provider: str, model: str, **extra) -> dict:
    return {"provider": provider, "model": model, "base_url": f"http://{fakes[provider].address}{BASE_PATH[provider]}",
            "key": "env:PC_KEY", **extra}


@pytest.fixture(scope="module")
def chain(fakes, tmp_path_factory):
    config = {
        "models": {
            "claude-auto": deployment(fakes, "anthropic", "claude-x@tokens=5,cached=30,cache_write=7,tag=auto", prompt_cache="auto"),
            "claude": deployment(fakes, "anthropic", "claude-x@tokens=5,tag=plain"),
            "gpt": deployment(fakes, "openai", "gpt-x@tokens=5,cached=12,tag=gpt"),
            "gem": deployment(fakes, "gemini", "gemini-x@tokens=5,cached=9,tag=gem"),
            # the response cache replays reasoning and tool calls as they came (paced, so the live
            # answer's frames are not merged by a busy writer either: the frames compare one to one)
            "gem-think": deployment(fakes, "gemini", "gemini-x@scenario=thinking,pace=0.03,tag=think"),
            "gpt-tool": deployment(fakes, "openai", "gpt-x@scenario=tool,pace=0.03,tag=tool"),
        },
        "cache": {"default": {"exact": False}, "models": {"gem-think": {"exact": True}, "gpt-tool": {"exact": True, "tool_calls": True}}},
    }
    path = tmp_path_factory.mktemp("pc") / "llmproxy.yaml"
    path.write_text(json.dumps(config))
    proxy = start_proxy(("--config", str(path)), (), {"PC_KEY": "sk-pc-test"})
    yield proxy
    proxy.stop()


def bodies(fake, tag: str) -> list[dict]:
    with urllib.request.urlopen(f"http://{fake.address}/_fake/state", timeout=5) as r:
        state = json.loads(r.read())
    out = []
    for req in state["requests"]:
        body = json.loads(req["body"] or "{}")
        if f"tag={tag}" in body.get("model", "") or f"tag={tag}" in req["path"]:
            out.append(body)
    return out


def marked(body: dict) -> list[str]:
    """Where the request carries cache_control: "system", "tools", "messages[i]"."""
    out = []
    system = body.get("system")
    if isinstance(system, list) and any("cache_control" in b for b in system):
        out.append("system")
    if any("cache_control" in t for t in body.get("tools", [])):
        out.append("tools")
    for i, turn in enumerate(body["messages"]):
        if any("cache_control" in b for b in turn["content"]):
            out.append(f"messages[{i}]")
    return out


async def test_anthropic_stable_prefix_is_marked_in_a_multi_turn_session_and_cache_tokens_reach_done(chain, fakes):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    async with connect(chain.ws_url) as ws:
        first = {"type": "start", "id": "t1", "model": "claude-auto", "conversation": "c", "tools": tools,
                 "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]}
        await send(ws, first)
        done1 = (await collect(ws, {"t1"}))["t1"][-1]
        await send(ws, {"type": "start", "id": "t2", "model": "claude-auto", "conversation": "c", "tools": tools,
                        "messages": [{"role": "user", "content": "And then?"}]})
        done2 = (await collect(ws, {"t2"}))["t2"][-1]
    sent = bodies(fakes["anthropic"], "auto")
    assert len(sent) == 2
    assert marked(sent[0]) == ["system", "tools"]  # one turn: no earlier turns yet
    # second turn: system, tools and the earlier turns (up to the previous answer) are the prefix
    assert marked(sent[1]) == ["system", "tools", "messages[1]"]
    assert sent[1]["messages"][1]["role"] == "assistant"
    for done in (done1, done2):
        assert done["type"] == "done"
        assert done["usage"]["cached_input_tokens"] == 30
        assert done["usage"]["cache_write_input_tokens"] == 7
        assert done["usage"]["prompt_tokens"] >= 37


async def test_client_breakpoints_pass_through_without_auto(chain, fakes):
    async with connect(chain.ws_url) as ws:
        await send(ws, {"type": "start", "id": "s", "model": "claude", "messages": [
            {"role": "system", "content": "Long instructions", "cache_control": {"type": "ephemeral"}},
            {"role": "user", "content": "Question"}]})
        frames = (await collect(ws, {"s"}))["s"]
    assert frames[-1]["type"] == "done"
    (body,) = bodies(fakes["anthropic"], "plain")
    assert marked(body) == ["system"]
    assert "cached_input_tokens" not in frames[-1]["usage"]  # nothing cached: the usage is as before


@pytest.mark.parametrize(("model", "provider", "cached"), [("gpt", "openai", 12), ("gem", "gemini", 9)])
async def test_cached_input_tokens_of_openai_and_gemini_reach_done(chain, model, provider, cached):
    async with connect(chain.ws_url) as ws:
        await send(ws, {"type": "start", "id": "s", "model": model, "messages": [{"role": "user", "content": "Hi"}]})
        frames = (await collect(ws, {"s"}))["s"]
    assert frames[-1]["type"] == "done", frames[-1]
    assert frames[-1]["usage"]["cached_input_tokens"] == cached


@pytest.mark.parametrize(("model", "kind"), [("gem-think", "reasoning"), ("gpt-tool", "tool_call")])
async def test_reasoning_and_tool_calls_replay_from_the_response_cache_as_they_came(chain, fakes, model, kind):
    tag = {"gem-think": "think", "gpt-tool": "tool"}[model]
    provider = {"gem-think": "gemini", "gpt-tool": "openai"}[model]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    extra = {"tools": tools} if model == "gpt-tool" else {}
    runs = []
    for _ in range(2):
        async with connect(chain.ws_url) as ws:
            await send(ws, {"type": "start", "id": "s", "model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}], **extra})
            runs.append((await collect(ws, {"s"}))["s"])
    live, cached = runs
    assert len(bodies(fakes[provider], tag)) == 1  # the second answer came from the cache
    assert cached[0]["cache"]["kind"] == "exact" and "cache" not in live[0]
    assert any(f["type"] == kind for f in live)
    strip = lambda fs: [{k: v for k, v in f.items() if k not in ("cache", "latency", "timing", "usage", "_t")} for f in fs]
    assert strip(cached) == strip(live)
