"""server/config.py: the YAML deployment file, key references, well-known models, errors."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from server.config import ConfigError, ServerConfig, build_catalog, load_config
from server.providers.adapter import Secret, Timeouts
from server.providers.registry import providers

ROOT = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "llmproxy.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_example_file_loads_with_its_keys_set(tmp_path, monkeypatch):
    secret = tmp_path / "gemini_key"
    secret.write_text("gemini-from-file\n")
    text = (ROOT / "config.example.yaml").read_text().replace("/run/secrets/gemini_api_key", str(secret))
    env = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a", "AZURE_OPENAI_API_KEY": "az"}
    config = load_config(write(tmp_path, text), providers(), env)
    by_name = {d.info.name: d for d in config.deployments}
    assert {d.model for d in config.deployments} == {"gpt-4o-mini", "chat", "gpt-4o-azure", "local-llama"}
    assert by_name["chat-gemini"].endpoint.key == Secret("gemini-from-file")
    assert by_name["chat-anthropic"].info.weight == 3
    assert by_name["chat-anthropic"].endpoint.timeouts == Timeouts(10, 60, 60)
    assert by_name["local-llama#1"].endpoint.key is None
    assert by_name["local-llama#1"].endpoint.headers == (("X-Team", "research"),)
    assert by_name["gpt-4o-azure#1"].endpoint.api_version == "2024-10-21"
    assert by_name["gpt-4o-mini#1"].endpoint.base_url == "https://api.openai.com/v1"


async def test_catalog_without_config_serves_demo_and_well_known_models():
    catalog = build_catalog(ServerConfig(), environ={"ANTHROPIC_API_KEY": "sk-a"})
    try:
        names = catalog.names()
        assert {"demo", "demo-fast", "claude-sonnet-4-5", "claude-haiku-4-5"} <= set(names)
        assert "gpt-4o-mini" not in names and "gemini-2.5-flash" not in names
        assert catalog.backends("claude-haiku-4-5")[0].info.provider == "anthropic"
    finally:
        await catalog.aclose()


async def test_catalog_with_config_serves_config_and_demo(tmp_path):
    path = write(tmp_path, """
        models:
          fast:
            provider: openai-compatible
            base_url: http://127.0.0.1:9/v1
            model: llama
    """)
    catalog = build_catalog(ServerConfig(config_path=path), environ={"OPENAI_API_KEY": "sk-o"})
    try:
        assert catalog.names() == ["demo", "demo-fast", "fast"]  # well_known is off with a file
    finally:
        await catalog.aclose()


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("models:\n  m:\n    provider: opena\n", 3, "unknown provider 'opena'"),
        ("models:\n  m:\n    provider: openai\n    key: env:NOPE\n", 4, "NOPE"),
        ("models:\n  m:\n    provider: openai\n    key: sk-literal\n", 4, "key must be a reference"),
        ("models:\n  m:\n    provider: openai\n    key: env:K\n    weigth: 2\n", 5, "unknown key 'weigth'"),
        ("models:\n  m:\n    provider: azure\n    key: env:K\n", 3, "needs a base_url"),
        ("models:\n  m:\n    provider: openai\n    key: env:K\n    weight: -1\n", 5, "greater than 0"),
        ("models:\n  m:\n    provider: openai\n    key: env:K\n    timeouts: {stall_s: abc}\n", 5, "expected a number"),
        ("models:\n  m:\n    provider: openai\n    key: env:K\n    base_url: ftp://x\n", 5, "http://"),
        ("models:\n  demo:\n    provider: openai\n", 3, "built in"),
        ("models:\n  m:\n    provider: openai\n  m:\n    provider: openai\n", 4, "appears twice"),
        ("models:\n  m:\n    - model: x\n", 3, "needs a provider"),
        ("models:\n  m: [\n", 3, "invalid YAML"),
        ("models:\n  m:\n    provider: gemini\n    key: file:/nonexistent/key\n", 4, "cannot read the key file"),
        ("http:\n  transport: curl\nmodels: {}\n", 2, "transport must be native, aiohttp or httpx"),
        ("http:\n  ca_file: /nonexistent/ca.pem\nmodels: {}\n", 2, "no such CA file"),
        ("http:\n  transport: aiohttp\n  http2: true\nmodels: {}\n", 3, "http2 needs transport: httpx"),
        ("http:\n  transport: httpx\n  ca_file: /etc/hostname\nmodels: {}\n", 3, "ca_file needs transport: native or aiohttp"),
        ("models:\n  m:\n    provider: openai\n    key: env:K\n    headers: {\"X Org\": a}\n", 5, "not a valid HTTP token"),
        ("models:\n  m:\n    provider: openai\n    key: env:K\n    headers: {X-Org: \"a\\nb\"}\n", 5, "printable latin-1"),
        ("models:\n  m:\n    provider: openai\n    key: env:K\n    headers: {X-Org: \"\u20ac\"}\n", 5, "printable latin-1"),
    ],
)
def test_errors_name_file_line_and_problem(tmp_path, text, line, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, providers(), {"K": "sk-k"})
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert problem in message


@pytest.mark.parametrize(
    ("text", "module", "problem"),
    [
        ("http:\n  transport: httpx\n  http2: true\nmodels: {}\n", "h2", "pip install 'llmproxy[http2]'"),
    ],
)
def test_a_transport_whose_optional_dependency_is_missing_names_the_extra(tmp_path, monkeypatch, text, module, problem):
    # None in sys.modules is how Python itself marks a module as not importable.
    monkeypatch.setitem(sys.modules, module, None)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(path, providers(), {})


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        build_catalog(ServerConfig(config_path=str(tmp_path / "missing.yaml")), environ={})


def test_secret_is_redacted_everywhere():
    key = Secret("sk-very-secret")
    assert "sk-very-secret" not in repr(key) + str(key) + f"{key}" + repr([key])
    assert key.reveal() == "sk-very-secret"


async def test_a_key_over_plain_http_to_a_remote_host_is_warned_about_at_start(tmp_path, caplog):
    path = write(tmp_path, """
        models:
          remote:
            provider: openai-compatible
            base_url: http://10.1.2.3:8000/v1
            key: env:K
          named:
            provider: openai-compatible
            base_url: http://llm.internal.example/v1
            key: env:K
          local:
            - {provider: openai-compatible, base_url: "http://127.0.0.1:8000/v1", key: env:K}
            - {provider: openai-compatible, base_url: "http://localhost:8000/v1", key: env:K}
            - {provider: openai-compatible, base_url: "http://[::1]:8000/v1", key: env:K}
          tls:
            provider: openai-compatible
            base_url: https://10.1.2.3/v1
            key: env:K
          keyless:
            provider: openai-compatible
            base_url: http://10.9.9.9/v1
    """)
    caplog.set_level("WARNING", logger="llmproxy.config")
    catalog = build_catalog(ServerConfig(config_path=path), environ={"K": "sk-secret-value"})
    await catalog.aclose()
    warned = [r.getMessage() for r in caplog.records if "plain http://" in r.getMessage()]
    assert len(warned) == 2, warned
    assert "remote#1" in warned[0] and "10.1.2.3" in warned[0]
    assert "named#1" in warned[1] and "llm.internal.example" in warned[1]
    assert all("sk-secret-value" not in m for m in warned)
