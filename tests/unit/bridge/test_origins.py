"""Which page origins count as this machine's loopback."""

from __future__ import annotations

import pytest

from bridge.server import is_loopback_origin


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1:5173", "https://localhost", "http://[::1]:8080", "http://LOCALHOST:1"])
def test_loopback_pages_are_loopback(origin):
    assert is_loopback_origin(origin)


@pytest.mark.parametrize(
    "origin",
    ["null", "", "file://", "http://localhost.evil.com", "http://127.0.0.1.nip.io", "http://evil.com", "ws://localhost:1",
     "http://user@localhost:1", "http://localhost:3000/path", "http://localhost:bad", "http://10.0.0.1:80", "chrome-extension://abc"],
)
def test_anything_else_is_not(origin):
    assert not is_loopback_origin(origin)
