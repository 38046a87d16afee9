"""gRPC ignores channel and server option names it does not know, silently (that is how the
server's keepalive policy once went unset). Every name we pass must be one the installed gRPC
core defines: they are compiled into its extension module as strings."""

from __future__ import annotations

import re
from pathlib import Path

import grpc._cython.cygrpc as cygrpc

from bridge.main import channel_options
from server.main import server_options


def known_names() -> set[str]:
    data = Path(cygrpc.__file__).read_bytes()
    return {m.decode() for m in re.findall(rb"grpc\.[a-z0-9_.]+", data)}


def test_every_option_name_is_one_grpc_defines():
    known = known_names()
    assert "grpc.keepalive_time_ms" in known  # the scan itself works
    for name, _ in [*server_options(10_000), *server_options(10_000, reuse_port=True), *channel_options(30_000)]:
        assert name in known, f"{name} is not a gRPC option: gRPC would ignore it"


def test_so_reuseport_is_set_both_ways():
    """gRPC turns SO_REUSEPORT on by default: the server says 0 unless --reuse-port."""
    assert "grpc.so_reuseport" in known_names()
    assert dict(server_options(10_000))["grpc.so_reuseport"] == 0
    assert dict(server_options(10_000, reuse_port=True))["grpc.so_reuseport"] == 1


def test_the_old_misspelt_name_would_have_been_caught():
    assert "grpc.http2.min_recv_ping_interval_without_data_ms" not in known_names()
