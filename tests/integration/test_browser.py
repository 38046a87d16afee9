"""The demo chat page in headless Debian Chromium, driven by playwright-core from npm.

tests/browser/chat_page.mjs opens the page served by the bridge, types a prompt, watches the
answer grow token by token, presses Stop, and then watches that nothing more arrives. It records
the DOM updates with their times and every WebSocket frame the page sent and received; this test
judges them. The screenshot lands in tests/artifacts/chat.png.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.node import run_node
from tests.support.procs import ROOT

# 50 ms between tokens: slow enough that "one by one" and "nothing after Stop" are visible.
PACE = ("--demo-ttft-ms", "100", "--demo-tokens-per-s", "20", "--demo-jitter", "0.1")
INTERVAL_MS = 50
QUIET_MS = 15 * INTERVAL_MS  # the window after the stop in which no token may arrive
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = ROOT / "tests" / "artifacts" / "chat.png"


@pytest.mark.browser
def test_demo_page_streams_tokens_one_by_one_and_stop_really_stops(proxy_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing (make install-test installs Debian's chromium)")
    if not (ROOT / "clients/js/node_modules/playwright-core").is_dir():
        pytest.fail("playwright-core is missing: make install-test (npm install in clients/js)")
    p = proxy_factory(server_args=PACE)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)

    r = run_node(["tests/browser/chat_page.mjs", p.http_url + "/", str(SCREENSHOT), str(QUIET_MS)], timeout_s=90)

    assert r["ok"], r.get("failure")
    assert r["pageErrors"] == [] and r["consoleErrors"] == [], (r["pageErrors"], r["consoleErrors"])
    assert r["stopEnabled"] and r["sendDisabledWhileStreaming"]

    # What the page sent: a start for the demo model, then a cancel of that very stream.
    sent = [f for f in r["framesSent"] if f["type"] != "ping"]
    assert [f["type"] for f in sent] == ["start", "cancel"], sent
    start, cancel = sent
    assert start["model"] == "demo" and start["messages"][-1] == {"role": "user", "content": "Explain quantum computing"}
    sid = start["id"]
    assert cancel["id"] == sid

    # What the server sent for it: tokens, then `done` with finish_reason cancelled, then nothing.
    frames = [f for f in r["framesReceived"] if f.get("id") == sid]
    assert frames[0]["type"] == "started"
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "cancelled", frames[-1]
    assert all(f["type"] == "token" for f in frames[1:-1])
    tokens = frames[1:-1]
    assert frames[-1]["timing"]["tokens"] == sum(f.get("count", 1) for f in tokens)
    assert len(tokens) < 100, "the stop must cut the answer short (the full answer is ~180 tokens)"

    # Tokens appeared one by one: many separate DOM updates, spread over time like the pace.
    before_stop = [u for u in r["updates"] if 0 < u["count"] and u["t"] <= r["stoppedAt"]]
    assert len(before_stop) >= 10, before_stop
    assert max(b["count"] - a["count"] for a, b in zip(before_stop, before_stop[1:])) <= 2, before_stop
    first_ten = before_stop[:10]
    assert first_ten[-1]["t"] - first_ten[0]["t"] >= 9 * INTERVAL_MS * 0.5, "the first ten tokens arrived at once"

    # Stop really stopped: at most one token was in flight, and none came in the quiet window.
    assert r["tokensAtCancelled"] - r["tokensAtStop"] <= 2
    assert r["tokensAfterQuiet"] == r["tokensAtCancelled"] == len(tokens)
    assert not [u for u in r["updates"] if u["t"] > r["cancelledAt"]], "tokens arrived after the stream was cancelled"

    # The page shows it: the answer is exactly the streamed text, the finish reason, the timing.
    assert r["answer"] == "".join(f["token"] for f in tokens)
    assert r["answer"].startswith("Quantum computing uses the rules")
    assert r["finish"] == "cancelled" and "cancelled" in r["status"]
    assert "TTFT" in r["serverTiming"] and "tokens/s" in r["serverTiming"]
    titles = [re.fullmatch(r"(\d+)ms · seq (\d+)", t) for t in r["latencyTitles"]]  # each token's latency
    assert all(titles) and [int(m[2]) for m in titles] == sorted({int(m[2]) for m in titles}), r["latencyTitles"]
    assert r["sendEnabledAfter"] and not r["stopEnabledAfter"]

    assert SCREENSHOT.stat().st_size > 10_000
