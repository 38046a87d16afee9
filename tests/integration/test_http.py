"""Plain HTTP on the bridge's port: health, the demo page, the JS client, same 404 for misses."""

from __future__ import annotations

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.support.ws import open_ws


def test_healthz_and_static_pages(proxy):
    with httpx.Client(base_url=proxy.http_url) as http:
        assert http.get("/healthz").text == "ok\n"
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        js = http.get("/js/llmproxy.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]


@pytest.mark.parametrize("path", ["/nope", "/../server/main.py", "/%2e%2e/pyproject.toml", "/js/../../README.md", "/static/%5c..%5cetc"])
def test_every_miss_is_the_same_404(proxy, path):
    with httpx.Client(base_url=proxy.http_url) as http:
        r = http.get(path)
        assert (r.status_code, r.text) == (404, "not found\n")


async def test_foreign_origin_is_refused_at_the_handshake(proxy):
    with pytest.raises(InvalidStatus) as refused:
        async with open_ws(proxy.ws_url, origin="http://evil.example.com"):
            pass
    assert refused.value.response.status_code == 403
    async with open_ws(proxy.ws_url, origin=proxy.http_url) as ws:  # the page's own origin is fine
        await ws.send('{"type": "ping"}')
        assert "pong" in await ws.recv()
