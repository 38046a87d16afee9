"""Analytics through the real processes: /metrics, the Stats RPC and CLI, done-frame timing."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import httpx

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from tests.support.procs import ROOT, start_server
from tests.support.polling import eventually

PACE = ("--demo-ttft-ms", "40", "--demo-tokens-per-s", "200", "--demo-jitter", "0.1")


def metrics_url(proc) -> str:
    line = next(l for l in proc.lines if l.startswith("llmproxy-server metrics on "))
    return line.rsplit(" ", 1)[1]


async def run_streams(target: str, n: int, max_tokens: int = 20) -> list[tuple[float, float, pb.StreamDone, float]]:
    """Starts n streams over gRPC; returns (client ttft ms, client total ms, done, round trip ms)
    each, the round trip measured with pings on the same call just before."""
    out = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.LLMProxyStub(channel).Stream()
        # Establish the call first (session frame, a ping answered) so the clock below times
        # the stream, not the connection.
        await call.write(pb.ClientFrame(ping=pb.Ping(nonce=1)))
        while (await call.read()).WhichOneof("kind") != "pong":
            pass
        rtts = []
        for nonce in range(2, 9):
            sent = time.perf_counter()
            await call.write(pb.ClientFrame(ping=pb.Ping(nonce=nonce)))
            while (await call.read()).WhichOneof("kind") != "pong":
                pass
            rtts.append((time.perf_counter() - sent) * 1000)
        rtt = sorted(rtts)[len(rtts) // 2]
        starts = {}
        firsts = {}
        for i in range(n):
            starts[f"s{i}"] = time.perf_counter()
            await call.write(pb.ClientFrame(start=pb.StartStream(stream_id=f"s{i}", model="demo", messages=[pb.ChatMessage(role="user", content="Explain vaccines")], params=pb.GenerationParams(max_tokens=max_tokens))))
        await call.done_writing()
        while (frame := await call.read()) is not grpc.aio.EOF:
            now = time.perf_counter()
            kind = frame.WhichOneof("kind")
            if kind == "token" and frame.token.stream_id not in firsts:
                firsts[frame.token.stream_id] = now
            if kind == "done":
                sid = frame.done.stream_id
                out.append(((firsts[sid] - starts[sid]) * 1000, (now - starts[sid]) * 1000, frame.done, rtt))
    return out


async def test_metrics_stats_and_the_cli(tmp_path):
    db = tmp_path / "requests.sqlite3"
    server = start_server(*PACE, "--metrics-listen", "127.0.0.1:0", "--request-log", str(db))
    try:
        await run_streams(server.address, 6)
        # The janitor hands records over about once a second: wait for the sixth to arrive at
        # each end (metrics, live stats, request log), not for a fixed time.
        ttft_count = 'gen_ai_server_time_to_first_token_seconds_count{deployment="demo",gen_ai_provider_name="demo",gen_ai_request_model="demo"} '
        text = await eventually(lambda: httpx.get(metrics_url(server)).text, lambda t: f"{ttft_count}6.0" in t, "6 streams in /metrics")
        assert "gen_ai_server_time_per_output_token_seconds_bucket" in text
        assert 'gen_ai_client_token_usage_sum{gen_ai_provider_name="demo",gen_ai_request_model="demo",gen_ai_token_type="output"} 120.0' in text

        async def stats() -> pb.StatsResponse:
            async with grpc.aio.insecure_channel(server.address) as channel:
                return await pb_grpc.LLMProxyStub(channel).Stats(pb.StatsRequest(window_s=600))

        latest = await eventually(stats, lambda s: sum(r.streams for r in s.rows) >= 6, "6 streams in Stats")
        (row,) = latest.rows
        assert (row.name, row.streams, row.errors, row.completion_tokens) == ("demo", 6, 0, 120)
        assert 30 < row.ttft_p50_ms < 500 and row.ux_score == 1.0

        def cli_run() -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "server.analytics.cli", "--db", str(db)], cwd=ROOT, capture_output=True, text=True, timeout=30)

        def logged_six(cli: subprocess.CompletedProcess[str]) -> bool:
            lines = cli.stdout.splitlines()
            return cli.returncode == 0 and len(lines) > 1 and lines[1].split()[:2] == ["demo", "6"]

        cli = await eventually(cli_run, logged_six, "6 streams in the request log")
        assert cli.returncode == 0 and cli.stdout.splitlines()[1].split()[:2] == ["demo", "6"]
    finally:
        server.stop()


async def test_done_frame_timing_agrees_with_the_client_within_a_millisecond():
    server = start_server(*PACE)
    try:
        results = []
        for _ in range(7):
            results += await run_streams(server.address, 1)
        # The client's clock also holds the two gRPC hops the server cannot see (the start frame
        # up, the first token or the done frame down): one round trip, measured with pings on
        # the same call just before. What is left is the disagreement; medians of seven.
        raw_ttft = sorted(c_ttft - d.timing.ttft_us / 1000 for c_ttft, _, d, _ in results)
        diffs_ttft = sorted(abs(c_ttft - rtt - d.timing.ttft_us / 1000) for c_ttft, _, d, rtt in results)
        diffs_total = sorted(abs(c_total - rtt - d.timing.total_us / 1000) for _, c_total, d, rtt in results)
        rtt = sorted(r[3] for r in results)[3]
        print(f"\nclient - server, raw ttft {[round(x, 3) for x in raw_ttft]} ms; round trip {rtt:.3f} ms; "
              f"beyond the round trip: ttft {[round(x, 3) for x in diffs_ttft]}, total {[round(x, 3) for x in diffs_total]} ms")
        # The first token agrees within 1 ms. The total also holds the done frame's own work
        # (timing summary, usage, the record) and lands within about 0.7 ms alone, but up to
        # 1.4 ms while the rest of the suite loads this 2-core machine: 2 ms bounds it.
        assert diffs_ttft[3] < 1.0 and diffs_total[3] < 2.0
        assert all(d.timing.relay_max_us < 50_000 and d.timing.attempts == 1 for _, _, d, _ in results)
    finally:
        server.stop()
