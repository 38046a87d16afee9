"""The Node.js gRPC client (clients/node, issue 18.1) against the real server: list models, ping,
stream, cancel, resume after every TCP connection is reset (nothing lost, nothing repeated),
and the cut reported as an error when reconnecting is off. The script is tests/node/grpc_client.mjs."""

from __future__ import annotations

import pytest

from tests.support.node import run_node
from tests.support.procs import ROOT, start_server


@pytest.fixture
def server():
    s = start_server("--demo-ttft-ms", "20", "--demo-tokens-per-s", "150", "--demo-jitter", "0.2")
    yield s
    s.stop()


def test_node_grpc_client_streams_cancels_and_resumes(server):
    if not (ROOT / "clients" / "node" / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("clients/node/node_modules is missing: make install-test")
    r = run_node(["tests/node/grpc_client.mjs", server.address], timeout_s=90)
    assert "demo" in r["models"]
    assert r["pong"] == 7
    assert r["session"] is True
    assert r["direct"]["finish"] == "FINISH_REASON_LENGTH" and r["direct"]["tokens"] == 120
    assert all(n > 0 for n in r["direct"]["lengths"])
    assert r["cancel"]["finish"] == "FINISH_REASON_CANCELLED" and 5 <= r["cancel"]["tokens_seen"] < 2000
    assert r["resume"] == {"equal": True, "reconnects": r["resume"]["reconnects"], "duplicates": 0}
    assert r["resume"]["reconnects"] >= 1
    assert r["cut"] == {"error": "unavailable"}


def test_node_client_types_check_against_the_generated_types():
    """clients/node/index.d.ts over the types proto-loader-gen-types generated from protos/
    (npm install runs it): a typed backend use (clients/node/example.ts) compiles under strict."""
    import subprocess

    node_dir = ROOT / "clients" / "node"
    tsc = node_dir / "node_modules" / ".bin" / "tsc"
    if not tsc.exists() or not (node_dir / "generated" / "llmproxy.ts").exists():
        pytest.fail("clients/node is not installed (make install-test runs npm install, which generates the types)")
    proc = subprocess.run([str(tsc), "-p", "tsconfig.json"], cwd=node_dir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
