"""The React hook (clients/js/react.js), the Vue composable (clients/js/vue.js) and the RxJS
adapter for Angular (clients/js/rxjs.js), each in a small page in headless Chromium against a
real bridge (issue 18.5).

tests/browser/framework_page.mjs serves the page (tests/browser/pages/) from a static server of
its own, as an app's dev server would, and drives it: a long answer stopped (status
"cancelled", nothing more arrives), a modify (back to "waiting", then "streaming"), a short
answer to "done" with the page's and the server's time to first token, an unknown model as an
"error" state with its code. The same state (text, status, timing, error) in all three.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.node import run_node
from tests.support.procs import ROOT

PACE = ("--demo-ttft-ms", "50", "--demo-tokens-per-s", "50", "--demo-jitter", "0.1")
QUIET_MS = 750  # after the stop, no token may arrive in this window (about 37 token intervals)
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def bridge(request):
    from tests.support.procs import start_proxy

    p = start_proxy(PACE)
    yield p
    p.stop()


@pytest.mark.browser
@pytest.mark.parametrize("page", ["react", "vue", "rxjs"])
def test_framework_page_streams_stops_modifies_and_reports_errors(bridge, page):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing (make install-test installs Debian's chromium)")
    for package in ("playwright-core", "react", "react-dom", "vue", "rxjs"):
        if not (ROOT / "clients/js/node_modules" / package).is_dir():
            pytest.fail(f"{package} is missing: make install-test (npm install in clients/js)")

    r = run_node(["tests/browser/framework_page.mjs", bridge.http_url, page, str(QUIET_MS)], timeout_s=100)

    assert "failure" not in r, r
    assert r["pageErrors"] == [] and r["consoleErrors"] == [], r
    stop = r["stop"]
    assert stop["tokens"] >= 10 and stop["textLength"] > 0 and stop["unchangedAfterQuiet"], stop
    assert stop["tokens"] < 200, stop  # stopped long before the 2000-token answer's end
    assert stop["ttftMs"] > 0
    states = r["modify"]["states"]
    assert r["modify"]["error"] is None
    assert states[:2] == ["waiting", "streaming"] and states[-1] == "cancelled", states
    after = states[2:]
    assert "waiting" in after and "streaming" in after[after.index("waiting") :], states  # the restart, then the amended answer
    short = r["short"]
    assert short["tokens"] == 20 and short["textLength"] > 0, short
    assert short["ttftMs"] >= 40 and short["serverTtftMs"] >= 40, short  # the demo's 50 ms TTFT, seen by both
    assert r["error"]["code"] == "unknown_model"
    if page == "rxjs":
        assert r["completed"] == 4  # each answer's Observable completed after its final state
