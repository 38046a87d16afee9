"""The bench harness must not rot: its smoke variant runs every workload tiny, here.

Speed lives in `make bench`; these tests only check that every workload ran over every path,
that the JSON has the expected shape, and that the numbers are real (positive, finite). And,
as for every fake: the official OpenAI SDK reads the bench's fake upstream.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import ROOT, start

STREAM_KEYS = ("A1", "A50", "i", "ii", "iii_50", "iii_200", "vi", "iv")
PATH_FIELDS = ("streams", "failed", "tokens", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "per_token_ms", "proxy_cpu_us_per_token")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.timeout(90)
def test_bench_smoke_runs_every_workload_over_every_path(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| workload | path |" in run.stdout  # the table is printed
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.md").read_text().startswith("# llmproxy bench (smoke)")
    assert result["meta"]["smoke"] is True
    assert result["meta"]["openai_adapter"] == "available", result["meta"]["openai_adapter"]

    assert set(STREAM_KEYS) <= set(result["workloads"])
    for key in STREAM_KEYS:
        workload = result["workloads"][key]
        expected = {"grpc", "ws"} if key.startswith("A") else {"direct", "ws", "grpc"}
        if key in ("i", "iii_50", "iv"):
            expected.add("chat")  # the bridge's chat-completions API, next to the WebSocket
        assert set(workload["paths"]) == expected, key
        for name, path in workload["paths"].items():
            assert set(PATH_FIELDS) <= set(path), (key, name)
            assert path["failed"] == 0, (key, name, path["errors"])
            assert path["tokens"] == workload["streams"] * workload["tokens_per_stream"] * workload["rounds"], (key, name)
            for field in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "wall_s"):
                assert _positive(path[field]), (key, name, field, path[field])
            if workload["source"] == "upstream":  # every token carried the fake's send stamp
                assert _positive(path["relay_p50_ms"]) and _positive(path["relay_p99_ms"]), (key, name)
        for name, comparison in workload["comparisons"].items():
            assert comparison["against"] == workload["reference"] != name
            assert isinstance(comparison["added_ttft_p50_ms"], float)

    idle = result["idle"]
    assert idle["sessions"] > 0 and idle["held"] == idle["sessions"] and idle["dropped"] == 0
    assert idle["bridge_rss_after_kb"] > 0 and idle["server_rss_after_kb"] > 0
    assert {t["name"] for t in result["targets"]} and all("measured" in t for t in result["targets"])


async def test_openai_sdk_reads_the_bench_fake_upstream() -> None:
    openai = pytest.importorskip("openai")
    fake = start("fake-upstream", ["bench.fake_upstream", "--port", "0"], "bench-fake-upstream listening on ")
    try:
        client = openai.AsyncOpenAI(base_url=f"http://{fake.address}/v1", api_key="sk-bench", max_retries=0)
        stream = await client.chat.completions.create(
            model="fake@tokens=5,pace_ms=1",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
    finally:
        fake.stop()
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) == 5 and all(t.startswith("|") and t[1:].isdigit() for t in texts)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None and usage.completion_tokens == 5


@pytest.mark.timeout(60)
def test_bench_floor_measures_every_side() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.floor", "--connections", "50", "--streams", "5", "--messages", "20", "--pace", "0.001", "--pings", "10", "--gap", "0.001"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) == 10 and all(math.isfinite(float(line.split()[-1])) for line in rows), run.stdout


@pytest.mark.timeout(90)
def test_bench_compares_upstream_transports_side_by_side(tmp_path: Path) -> None:
    # `--transports`: one chain per transport, both measured in the same rounds against direct.
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--only", "i,iii_50", "--transports", "native,aiohttp", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["meta"]["transports"] == "native,aiohttp"
    assert set(result["workloads"]) == {"i", "iii_50"}
    for key, workload in result["workloads"].items():
        assert set(workload["paths"]) == {"direct", "ws-native", "ws-aiohttp"}, key
        assert set(workload["comparisons"]) == {"ws-native", "ws-aiohttp"}, key
        for name, path in workload["paths"].items():
            assert path["failed"] == 0, (key, name, path["errors"])
            assert path["tokens"] == workload["streams"] * workload["tokens_per_stream"] * workload["rounds"], (key, name)


@pytest.mark.timeout(90)
def test_bench_runs_over_two_servers_and_two_bridges_on_redis(tmp_path: Path) -> None:
    # `--procs 2`: what make cluster runs (issue 14's 1-vs-2 processes per role); every path works
    # through the shared ports and the proxy's CPU is counted over all four processes.
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--only", "iii_50,iv", "--procs", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["meta"]["processes"].startswith("2 servers")
    assert "Processes: 2 servers" in (tmp_path / "smoke.md").read_text()
    assert set(result["workloads"]) == {"iii_50", "iv"}
    for key, workload in result["workloads"].items():
        assert set(workload["paths"]) == {"direct", "ws", "grpc", "chat"}, key
        for name, path in workload["paths"].items():
            assert path["failed"] == 0, (key, name, path["errors"])
            assert path["tokens"] == workload["streams"] * workload["tokens_per_stream"] * workload["rounds"], (key, name)
