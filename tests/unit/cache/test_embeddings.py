"""The embeddings APIs against the fake OpenAI and Gemini servers, and the local model offline."""

from __future__ import annotations

import math

import pytest

from server.cache.embeddings import HttpEmbedder, LocalEmbedder
from server.errors import UpstreamServerError
from server.providers.adapter import Secret
from tests.fakes.base import FakeServer
from tests.fakes.gemini import GeminiFake
from tests.fakes.openai import OpenAIFake


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


@pytest.mark.parametrize(("fake_cls", "kind", "base"), [(OpenAIFake, "openai", "/v1"), (GeminiFake, "gemini", "/v1beta")])
async def test_provider_embeddings_api(fake_cls, kind, base):
    async with FakeServer(fake_cls()) as fake:
        embedder = HttpEmbedder(kind, f"{fake.url}{base}", "embed-x", Secret("sk-embed"))
        try:
            a = await embedder.embed("What is the capital of France?")
            b = await embedder.embed("what is the capital of france")
            c = await embedder.embed("Explain the rules of cricket in detail")
        finally:
            await embedder.aclose()
        request = fake.last_request
    assert math.isclose(math.fsum(x * x for x in a), 1.0, rel_tol=1e-6)  # unit length
    assert cosine(a, b) > 0.99 and cosine(a, c) < 0.9
    if kind == "openai":
        assert request.path == "/v1/embeddings" and request.headers["authorization"] == "Bearer sk-embed"
        assert request.json()["model"] == "embed-x"
    else:
        assert request.path == "/v1beta/models/embed-x:embedContent" and request.headers["x-goog-api-key"] == "sk-embed"


async def test_an_embeddings_api_error_is_typed():
    async with FakeServer(GeminiFake()) as fake:  # no OpenAI route there: a 404
        embedder = HttpEmbedder("openai", f"{fake.url}/v1", "embed-x", None)
        try:
            with pytest.raises(UpstreamServerError):
                await embedder.embed("hi")
        finally:
            await embedder.aclose()


def test_the_local_model_loads_from_the_package_without_a_download(monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("the local model tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    embedder = LocalEmbedder()
    assert len(embedder.embed_now("hello")) == 256
