"""The live dashboard in headless Chromium during a load run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.node import run_node
from tests.support.procs import ROOT
from tests.support.ws import collect, open_ws, send, start_frame

SECRET_PROMPT = "zebra-cobalt-417 explain quantum computing"


async def load(ws_url: str, stop: asyncio.Event) -> int:
    """Waves of concurrent streams until told to stop; returns how many ran."""
    ran = 0
    async with open_ws(ws_url) as ws:
        while not stop.is_set():
            ids = {f"load-{ran + i}" for i in range(6)}
            for sid in ids:
                await send(ws, start_frame(sid, SECRET_PROMPT, max_tokens=40))
            await collect(ws, ids)
            ran += len(ids)
    return ran


@pytest.mark.browser
async def test_dashboard_shows_live_figures_and_never_a_prompt(proxy_factory):
    p = proxy_factory(server_args=("--demo-ttft-ms", "60", "--demo-tokens-per-s", "60", "--demo-jitter", "0.2"))
    shot = ROOT / "tests" / "artifacts" / "dashboard.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loader = asyncio.create_task(load(p.ws_url, stop))
    try:
        shown = await asyncio.to_thread(run_node, ["tests/browser/dashboard.mjs", p.http_url, str(shot)], 60)
    finally:
        stop.set()
        ran = await asyncio.wait_for(loader, 30)
    assert ran >= 6
    assert shown["badge"] == "live" and shown["snapshots"] >= 2
    assert shown["maxActive"] > 0 and shown["maxTps"] > 0 and shown["ended"] >= 6
    assert shown["ttftBars"] >= 1 and shown["itlBars"] >= 1
    assert any(row.startswith("demo") for row in shown["deployments"])
    assert all(s.startswith("load-") for s in shown["slowest"]) and shown["slowest"]
    assert "zebra-cobalt" not in shown["html"] and "quantum" not in shown["html"]
    assert Path(shot).stat().st_size > 10_000
