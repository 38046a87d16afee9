"""The caches on the bridge's HTTP APIs: `Cache-Control: no-cache / no-store` and
`X-LLMProxy-Cache-TTL` on the request, `X-LLMProxy-Cache` on a replayed answer, and the
providers' cached input tokens in OpenAI's and Anthropic's usage shapes."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.integration.test_prompt_cache import bodies, marked
from tests.support.procs import start, start_proxy


@pytest.fixture(scope="module")
def fakes():
    procs = {p: start(f"fake-{p}", [f"tests.fakes.{p}", "--port", "0"], f"fake-{p} listening on ") for p in ("openai", "anthropic")}
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.fixture(scope="module")
def chain(fakes, tmp_path_factory):
    config = {
        "models": {
            "gpt": {"provider": "openai", "model": "gpt-x@tokens=5,cached=12,tag=hgpt", "base_url": f"http://{fakes['openai'].address}/v1", "key": "env:H_KEY"},
            "claude": {"provider": "anthropic", "model": "claude-x@tokens=5,cached=30,cache_write=7,tag=hclaude",
                       "base_url": f"http://{fakes['anthropic'].address}/v1", "key": "env:H_KEY"},
        },
        "cache": {"pace": "instant"},
    }
    path = tmp_path_factory.mktemp("cache-http") / "llmproxy.yaml"
    path.write_text(json.dumps(config))
    proxy = start_proxy(("--config", str(path)), ("--http-port", "0"), {"H_KEY": "sk-h"})
    yield proxy
    proxy.stop()


def chat(chain, prompt: str, headers: dict[str, str] | None = None, stream: bool = False) -> httpx.Response:
    body = {"model": "gpt", "messages": [{"role": "user", "content": prompt}], "stream": stream}
    return httpx.post(f"{chain.api_url}/v1/chat/completions", json=body, headers=headers or {}, timeout=20)


def test_openai_chat_replays_from_the_cache_and_says_so(chain):
    prompt = f"HTTP cache {uuid.uuid4().hex[:8]}"
    live = chat(chain, prompt)
    assert live.status_code == 200 and "x-llmproxy-cache" not in live.headers
    assert live.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 12  # the provider's prompt cache
    hit = chat(chain, prompt)
    assert hit.headers["x-llmproxy-cache"] == "exact"
    assert hit.json()["choices"][0]["message"]["content"] == live.json()["choices"][0]["message"]["content"]
    streamed = chat(chain, prompt, stream=True)
    assert streamed.headers["x-llmproxy-cache"] == "exact" and "data: [DONE]" in streamed.text


def test_cache_control_request_directives(chain):
    prompt = f"Directives {uuid.uuid4().hex[:8]}"
    chat(chain, prompt, {"Cache-Control": "no-store"})
    assert "x-llmproxy-cache" not in chat(chain, prompt).headers  # not stored by the first; stored now
    assert "x-llmproxy-cache" not in chat(chain, prompt, {"Cache-Control": "no-cache"}).headers
    assert chat(chain, prompt, {"X-LLMProxy-Cache-TTL": "60"}).headers["x-llmproxy-cache"] == "exact"
    bad = chat(chain, prompt, {"X-LLMProxy-Cache-TTL": "soon"})
    assert bad.status_code == 400 and "X-LLMProxy-Cache-TTL" in bad.json()["error"]["message"]


def test_anthropic_messages_pass_cache_control_through_and_report_cache_tokens(chain, fakes):
    body = {
        "model": "claude", "max_tokens": 50,
        "system": [{"type": "text", "text": "Long instructions", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": f"Hello {uuid.uuid4().hex[:8]}"}]}],
    }
    r = httpx.post(f"{chain.api_url}/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}, timeout=20)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["cache_read_input_tokens"] == 30 and usage["cache_creation_input_tokens"] == 7
    assert usage["input_tokens"] == 11  # Anthropic's input_tokens leaves the cached prefix out, as the fake said
    sent = bodies(fakes["anthropic"], "hclaude")
    assert marked(sent[-1]) == ["system"]
