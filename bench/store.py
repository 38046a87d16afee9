"""The store's cost: workload (iii) 50 streams with the memory store and with Redis, side by
side, several times in turn (the machine is shared and noisy); `make bench` keeps the output in
bench/results/store.txt:

    python -m bench.store [--pairs 3] [--rounds 3]

Each pair runs `bench.run --only iii_50` with the memory store, then with `--store redis://`
on a fresh redis-server (no persistence, as a benchmark of the proxy, not of the disk). Figures
per path (WebSocket through the bridge): proxy CPU per token (server + bridge), the relay's
added p50 / p99, first-token p99; and redis-server's own CPU per token, read from /proc.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.redis import RedisServer


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 10 ms


def run(out: Path, rounds: int, *server_args: str) -> dict:
    cmd = [sys.executable, "-m", "bench.run", "--only", "iii_50", "--rounds", str(rounds), "--out", str(out), *[f"--server-arg={a}" for a in server_args]]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "latest.json").read_text())["workloads"]["iii_50"]["paths"]["ws"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"memory": [], "redis": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            rows["memory"].append(run(Path(tmp) / f"m{i}", args.rounds))
            redis = RedisServer(persist=False).start()
            try:
                assert redis.popen is not None
                before = cpu_s(redis.popen.pid)
                ws = run(Path(tmp) / f"r{i}", args.rounds, f"--store={redis.url}")
                ws["redis_cpu_us_per_token"] = (cpu_s(redis.popen.pid) - before) / max(1, ws["tokens"]) * 1e6
                rows["redis"].append(ws)
            finally:
                redis.close()
    print("(iii) 50 streams x 200 tokens, WebSocket path, memory store vs Redis, run in turn")
    print("| store | run | proxy CPU us/token (server + bridge) | relay p50 ms | relay p99 ms | TTFT p99 ms | redis-server CPU us/token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for store, runs in rows.items():
        for i, p in enumerate(runs):
            server = p["server_cpu_s"] / max(1, p["tokens"]) * 1e6
            bridge = p["bridge_cpu_s"] / max(1, p["tokens"]) * 1e6
            redis_cpu = f"{p['redis_cpu_us_per_token']:.1f}" if "redis_cpu_us_per_token" in p else "-"
            print(
                f"| {store} | {i + 1} | {p['proxy_cpu_us_per_token']:.1f} ({server:.1f} + {bridge:.1f}) | {p['relay_p50_ms']:.2f} | "
                f"{p['relay_p99_ms']:.2f} | {p['ttft_p99_ms']:.1f} | {redis_cpu} |"
            )
    med = {s: statistics.median(p["proxy_cpu_us_per_token"] for p in runs) for s, runs in rows.items()}
    print(f"\nmedian proxy CPU us/token: memory {med['memory']:.1f}, redis {med['redis']:.1f}: redis / memory = {med['redis'] / med['memory']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
