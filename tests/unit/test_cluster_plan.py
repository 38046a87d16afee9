"""What `make cluster` starts (llmproxy_cli/cluster.py's Plan), without starting anything.
The processes themselves: tests/integration/test_cluster_run.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from llmproxy_cli.cluster import ensure_relay_token, parse_args


def flag(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_defaults_one_of_each_per_core_on_makes_ports():
    plan = parse_args([])
    assert plan.procs == (os.cpu_count() or 1)
    assert (plan.grpc_port, plan.ws_port, plan.http_port, plan.metrics_port_base) == (50051, 8765, 8766, 9464)
    assert plan.redis_port != 6379  # Debian's own redis-server service listens there
    assert plan.relay_token_file == Path(".run/relay-token")


def test_servers_share_the_grpc_port_and_each_has_its_own_relay_and_metrics_port():
    plan = parse_args(["--procs", "3", "--grpc-port", "5000", "--relay-port-base", "5010", "--metrics-port-base", "9000", "--redis-port", "7000"])
    commands = [plan.server_command(i) for i in range(3)]
    for i, argv in enumerate(commands):
        assert flag(argv, "--listen") == ["127.0.0.1:5000"] and "--reuse-port" in argv
        assert flag(argv, "--also-listen") == [f"127.0.0.1:{5010 + i}"]
        assert flag(argv, "--metrics-listen") == [f"127.0.0.1:{9000 + i}"]
        assert flag(argv, "--store") == ["redis://127.0.0.1:7000/0"]
        assert flag(argv, "--relay-token-file") == [".run/relay-token"]
    assert len({flag(a, "--server-id")[0] for a in commands}) == 3
    assert len({flag(a, "--request-log")[0] for a in commands}) == 3  # one SQLite writer per file


def test_bridges_share_their_ports_and_relay_to_every_server():
    plan = parse_args(["--procs", "2", "--ws-port", "1000", "--http-port", "1001", "--allowed-origin", "https://a.example", "--bridge-arg=--log-level=DEBUG"])
    for i in range(2):
        argv = plan.bridge_command(i)
        assert flag(argv, "--port") == ["1000"] and flag(argv, "--http-port") == ["1001"] and "--reuse-port" in argv
        assert flag(argv, "--grpc-target") == ["127.0.0.1:50061,127.0.0.1:50062"]
        assert flag(argv, "--allowed-origin") == ["https://a.example"]
        assert argv[-1] == "--log-level=DEBUG"


def test_redis_keeps_its_data_and_never_evicts():
    argv = parse_args(["--run-dir", "/tmp/x", "--redis-port", "7001"]).redis_command("redis-server")
    assert flag(argv, "--appendonly") == ["yes"]
    assert flag(argv, "--maxmemory-policy") == ["noeviction"]
    assert flag(argv, "--dir") == ["/tmp/x/redis"] and flag(argv, "--port") == ["7001"]


def test_the_urls_name_every_process():
    text = parse_args(["--procs", "2"]).urls()
    for url in ("ws://127.0.0.1:8765/stream", "http://127.0.0.1:8766/v1", "http://127.0.0.1:8765/dashboard.html",
                "http://127.0.0.1:9464/metrics", "http://127.0.0.1:9465/metrics", "redis://127.0.0.1:6399/0", "127.0.0.1:50051"):
        assert url in text, url


def test_the_relay_token_is_made_once_for_this_user_only(tmp_path):
    path = tmp_path / "run" / "relay-token"
    ensure_relay_token(path)
    first = path.read_text()
    assert len(first.strip()) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    ensure_relay_token(path)
    assert path.read_text() == first
