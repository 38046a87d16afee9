"""Prompt embeddings for the semantic cache: a small local model shipped inside a package, or a
provider's embeddings API. Every embedder returns a unit-length vector."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from server.errors import UpstreamServerError, UpstreamTimeout
from server.providers.adapter import Secret


class Embedder(Protocol):
    name: str

    async def embed(self, text: str) -> tuple[float, ...]:
        """A unit-length embedding of `text`. Raises `ProxyError` when an API call fails."""


def _unit(values: Any) -> tuple[float, ...]:
    vector = np.asarray(values, dtype=np.float64)
    norm = float(np.linalg.norm(vector)) or 1.0
    return tuple((vector / norm).tolist())


class LocalEmbedder:
    """WordLlama (https://github.com/dleemiller/WordLlama): its 256-dimension weights and its
    tokenizer ship inside the `wordllama` wheel, so nothing is downloaded at run time (the files
    are loaded from the package's own directory with downloads disabled). About 0.05 ms a prompt."""

    name = "local:wordllama"

    def __init__(self) -> None:
        import wordllama

        self._model = wordllama.WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)

    def embed_now(self, text: str) -> tuple[float, ...]:
        return _unit(self._model.embed([text])[0])

    async def embed(self, text: str) -> tuple[float, ...]:
        return self.embed_now(text)


class HttpEmbedder:
    """A provider's embeddings API: OpenAI-compatible `POST {base_url}/embeddings`, or Gemini
    `POST {base_url}/models/{model}:embedContent`. Base URL and key come from the config only."""

    def __init__(self, kind: str, base_url: str, model: str, key: Secret | None, timeout_s: float = 10.0) -> None:
        self.name = f"{kind}:{model}"
        self._kind = kind
        self._base_url = base_url.rstrip("/")
        self._model = model
        self._key = key
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def embed(self, text: str) -> tuple[float, ...]:
        headers = {"content-type": "application/json"}
        if self._kind == "gemini":
            url = f"{self._base_url}/models/{self._model}:embedContent"
            body: dict[str, Any] = {"model": f"models/{self._model}", "content": {"parts": [{"text": text}]}}
            if self._key is not None:
                headers["x-goog-api-key"] = self._key.reveal()
        else:
            url = f"{self._base_url}/embeddings"
            body = {"model": self._model, "input": text}
            if self._key is not None:
                headers["authorization"] = f"Bearer {self._key.reveal()}"
        try:
            response = await self._client.post(url, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("the embeddings API timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamServerError(f"the embeddings API failed: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise UpstreamServerError(f"the embeddings API answered {response.status_code}", status=response.status_code)
        try:
            data = response.json()
            values = data["embedding"]["values"] if self._kind == "gemini" else data["data"][0]["embedding"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UpstreamServerError("the embeddings API answered an unexpected body") from exc
        return _unit(values)

    async def aclose(self) -> None:
        await self._client.aclose()


_DEFAULT_URLS = {"openai": "https://api.openai.com/v1", "gemini": "https://generativelanguage.googleapis.com/v1beta"}
_DEFAULT_MODELS = {"openai": "text-embedding-3-small", "gemini": "text-embedding-004"}


def build_embedder(section: Mapping[str, Any], env: Mapping[str, str], where: str) -> Embedder:
    """The configured embedder; raises `ConfigError`."""
    from server.config import ConfigError

    kind = str(section.get("provider", "local"))
    if kind == "local":
        try:
            return LocalEmbedder()
        except (ImportError, OSError) as exc:
            raise ConfigError(f"{where}: the local embedding model cannot be loaded: {exc}") from None
    if kind not in _DEFAULT_URLS:
        raise ConfigError(f"{where}.provider must be local, openai or gemini")
    key: Secret | None = None
    ref = section.get("key")
    if ref is not None:
        scheme, _, rest = str(ref).partition(":")
        if scheme == "env" and rest in env:
            key = Secret(env[rest])
        elif scheme == "file" and rest:
            try:
                key = Secret(Path(rest).read_text().strip())
            except OSError as exc:
                raise ConfigError(f"{where}.key: cannot read {rest}: {exc.strerror}") from None
        else:
            raise ConfigError(f"{where}.key must be env:NAME (set) or file:/path")
    base_url = str(section.get("base_url", _DEFAULT_URLS[kind]))
    return HttpEmbedder(kind, base_url, str(section.get("model", _DEFAULT_MODELS[kind])), key, float(section.get("timeout_s", 10.0)))


__all__ = ["Embedder", "HttpEmbedder", "LocalEmbedder", "build_embedder"]
