"""The Grafana dashboard (grafana/llmproxy-dashboard.json, issue 18.6) queries only metrics the
server really exposes, with labels those metrics really have.

A real server with --metrics-listen runs a few streams; every metric name in every panel query
and template variable must be a series of a family in its /metrics (a counter's `_total`, a
histogram's `_bucket`/`_sum`/`_count`), and every label a query groups or filters by must be a
label of one of the metrics it reads.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase

from llmproxy_client import LLMProxyClient
from server.analytics.metrics import Metrics
from tests.support.procs import ROOT, start_server

DASHBOARD = ROOT / "grafana" / "llmproxy-dashboard.json"
METRIC = re.compile(r"\b((?:gen_ai|llmproxy)_[a-z0-9_]+)\b")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
MATCHER = re.compile(r"[{,]\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# The text format's TYPE line names a counter with its _total already; a histogram without its suffixes.
SUFFIXES = {"counter": ("",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def queries(dash: dict) -> list[str]:
    found = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            found.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return found


def families(text: str) -> dict[str, str]:
    """series name -> family name, from the # TYPE lines."""
    series: dict[str, str] = {}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        for suffix in SUFFIXES.get(kind, ("",)):
            series[family + suffix] = family
    return series


def sample_labels(text: str) -> dict[str, set[str]]:
    """series name -> label names seen on its samples."""
    labels: dict[str, set[str]] = {}
    for name, body in re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", text, re.M):
        labels.setdefault(name, set()).update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', body))
    return labels


def declared_labels() -> dict[str, set[str]]:
    """family name -> declared label names, for families with no sample yet (no retry happened)."""
    declared: dict[str, set[str]] = {}
    for value in vars(Metrics()).values():
        if isinstance(value, MetricWrapperBase):
            declared[value._name] = declared[value._name + "_total"] = set(value._labelnames)
    return declared


@pytest.fixture(scope="module")
def exposition() -> str:
    server = start_server("--metrics-listen", "127.0.0.1:0", "--demo-ttft-ms", "10", "--demo-tokens-per-s", "500")
    try:
        url = next(l for l in server.lines if l.startswith("llmproxy-server metrics on ")).rsplit(" ", 1)[1]

        async def streams() -> None:
            async with LLMProxyClient(server.address) as client:
                handles = [client.stream(model="demo", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=10) for i in range(3)]
                for h in handles:
                    await h.result()

        asyncio.run(streams())
        deadline = time.monotonic() + 20  # the janitor hands records to the metrics about once a second
        while "gen_ai_server_time_per_output_token_seconds_bucket{" not in (text := httpx.get(url).text):
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.1)
        return text
    finally:
        server.stop()


def test_the_dashboard_covers_what_operators_ask_for():
    dash = json.loads(DASHBOARD.read_text())
    text = " ".join(queries(dash))
    for needed in (
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_time_per_output_token_seconds_bucket",
        "gen_ai_client_token_usage_sum",
        "llmproxy_streams_total",
        "llmproxy_upstream_attempt_failures_total",
        "llmproxy_breaker_state",
    ):
        assert needed in text, needed
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])


def test_every_queried_metric_and_label_exists_in_metrics(exposition):
    dash = json.loads(DASHBOARD.read_text())
    series = families(exposition)
    seen = sample_labels(exposition)
    declared = declared_labels()
    for expr in queries(dash):
        used = {l.strip() for group in BY.findall(expr) for l in group.split(",") if l.strip()} | set(MATCHER.findall(expr))
        names = set(METRIC.findall(expr)) - used  # label names such as gen_ai_token_type are not metrics
        assert names, expr
        missing = sorted(n for n in names if n not in series)
        assert not missing, f"not in /metrics: {missing} (query: {expr})"
        available = {"le"} if any(n.endswith("_bucket") for n in names) else set()
        for name in names:
            available |= seen.get(name, set()) | declared.get(series[name], set())
        assert used <= available, f"labels {sorted(used - available)} are on none of {sorted(names)} (query: {expr})"


def test_the_check_catches_a_misspelt_metric(exposition):
    """The check above can fail: a query on a metric the server does not have is not in /metrics."""
    assert "gen_ai_server_time_to_first_token_bucket" not in families(exposition)
    assert "llmproxy_streams" not in families(exposition)  # a counter's series is llmproxy_streams_total
