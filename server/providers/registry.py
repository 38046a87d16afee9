"""The one map from provider name to what builds its backends. Nothing else branches on a
provider's name: the config looks the name up here, and what it finds knows the rest.

Each entry says how to build a `Backend` for one deployment, which environment variable holds
the key of its well-known models, and which models those are (served out of the box when that
variable is set and no config file says otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from server.providers.adapter import Adapter, Endpoint
from server.providers.anthropic import AnthropicAdapter
from server.providers.base import Backend, DeploymentInfo
from server.providers.demo import CorpusEntry, DemoBackend, DemoPace
from server.providers.gemini import GeminiAdapter
from server.providers.http import ClientPool, HttpBackend
from server.providers.openai import AzureOpenAIAdapter, OpenAIAdapter


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What backends share, built once at start-up."""

    pool: ClientPool
    demo_pace: DemoPace
    corpus: tuple[CorpusEntry, ...]


BackendFactory = Callable[[DeploymentInfo, Endpoint, BuildContext], Backend]


@dataclass(frozen=True, slots=True)
class Provider:
    """One provider: how to build a backend, and what the config needs to know about it."""

    build: BackendFactory
    adapter: Adapter | None = None  # None: not an HTTP provider (demo)
    needs_key: bool = True
    needs_base_url: bool = False
    key_env: str = ""  # the environment variable of the well-known models' key
    well_known: tuple[str, ...] = ()

    @property
    def default_base_url(self) -> str:
        return self.adapter.default_base_url if self.adapter is not None else ""


def _http(adapter: Adapter) -> BackendFactory:
    def build(info: DeploymentInfo, endpoint: Endpoint, ctx: BuildContext) -> Backend:
        return HttpBackend(info, adapter, endpoint, ctx.pool)

    return build


def _demo(info: DeploymentInfo, endpoint: Endpoint, ctx: BuildContext) -> Backend:
    return DemoBackend(info, ctx.demo_pace, ctx.corpus)


def providers() -> Mapping[str, Provider]:
    """A fresh registry (no module-level state)."""
    openai = OpenAIAdapter("openai", "https://api.openai.com/v1", "max_completion_tokens")
    compatible = OpenAIAdapter("openai-compatible", "", "max_tokens")
    azure = AzureOpenAIAdapter()
    anthropic = AnthropicAdapter()
    gemini = GeminiAdapter()
    return {
        "openai": Provider(
            _http(openai),
            openai,
            key_env="OPENAI_API_KEY",
            well_known=("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano"),
        ),
        # vLLM, Ollama, llama.cpp server, Groq, Together, Mistral, DeepSeek, OpenRouter, ...:
        # the base_url is required and a key optional (local servers need none).
        "openai-compatible": Provider(_http(compatible), compatible, needs_key=False, needs_base_url=True),
        "azure": Provider(_http(azure), azure, needs_base_url=True),
        "anthropic": Provider(
            _http(anthropic),
            anthropic,
            key_env="ANTHROPIC_API_KEY",
            well_known=("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"),
        ),
        "gemini": Provider(
            _http(gemini),
            gemini,
            key_env="GEMINI_API_KEY",
            well_known=("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash-lite"),
        ),
        "demo": Provider(_demo, None, needs_key=False),
    }
