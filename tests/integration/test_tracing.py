"""OpenTelemetry traces (server/tracing.py, issue 18.3), off unless --otlp-endpoint.

A receiver in the test takes the server's OTLP/HTTP JSON exports. A gRPC client sends a
`traceparent`; its stream runs on an OpenAI-shaped fake whose first answer is a 503, so the
router tries twice. Checked: the stream span is the child of the client's span, in its trace,
with the gen_ai attributes; one attempt span per upstream attempt under it (the failed one
marked); the provider received each attempt's own `traceparent`; no prompt text and no key in
any export. Without --otlp-endpoint the provider gets no `traceparent`.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from tests.support.procs import start, start_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
PROMPT = "a private prompt that must never be exported"
KEY = "sk-tracing-test-key"


class Receiver:
    """An OTLP/HTTP collector stand-in: keeps every JSON body POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path == "/v1/traces" and self.headers.get("content-type", "").startswith("application/json"):
                    outer.bodies.append(body)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def spans(self) -> list[dict]:
        return [s for b in self.bodies for rs in json.loads(b)["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]

    def close(self) -> None:
        self.server.shutdown()


def attrs(span: dict) -> dict:
    out = {}
    for a in span["attributes"]:
        (kind, value), = a["value"].items()
        out[a["key"]] = [v["stringValue"] for v in value["values"]] if kind == "arrayValue" else int(value) if kind == "intValue" else value
    return out


@pytest.fixture(scope="module")
def fake():
    proc = start("fake-openai", ["tests.fakes.openai", "--port", "0"], "fake-openai listening on ")
    yield proc
    proc.stop()


def config_file(tmp_path, fake, tag: str):
    upstream = f"gpt-4o-mini@status=503,times=1,tag={tag}"
    config = {
        "routing": {"retry": {"max_attempts": 3, "backoff_base_s": 0.02, "backoff_max_s": 0.1, "deadline_s": 5}},
        "models": {"traced": {"deployments": [{"name": "fake-1", "provider": "openai", "model": upstream, "base_url": f"http://{fake.address}/v1", "key": "env:TRACING_KEY"}]}},
    }
    path = tmp_path / "llmproxy.yaml"
    path.write_text(json.dumps(config))
    return path, upstream


def run_stream(address: str, metadata: tuple[tuple[str, str], ...]) -> pb.StreamDone:
    with grpc.insecure_channel(address) as channel:
        start_frame = pb.ClientFrame(start=pb.StartStream(stream_id="t1", model="traced", messages=[pb.ChatMessage(role="user", content=PROMPT)]))
        for frame in pb_grpc.LLMProxyStub(channel).Stream(iter([start_frame]), metadata=metadata, timeout=30):
            kind = frame.WhichOneof("kind")
            if kind == "done":
                return frame.done
            assert kind != "error", frame
    pytest.fail("the stream ended without done")


def provider_requests(fake, tag: str) -> list[dict]:
    with urllib.request.urlopen(f"http://{fake.address}/_fake/state", timeout=5) as r:
        state = json.load(r)
    return [q for q in state["requests"] if tag in q.get("body", "") or tag in json.dumps(q)]


def test_spans_parent_links_gen_ai_attributes_and_propagation(tmp_path, fake):
    receiver = Receiver()
    path, upstream = config_file(tmp_path, fake, "traced-on")
    server = start_server("--config", str(path), "--otlp-endpoint", receiver.url, env={"TRACING_KEY": KEY})
    try:
        done = run_stream(server.address, (("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),))
        assert done.timing.attempts == 2  # the 503, then the answer
        deadline = time.monotonic() + 20  # records reach the tracer about once a second; exports too
        while not any(s["name"] == "chat traced" for s in receiver.spans()):
            assert time.monotonic() < deadline, receiver.spans()
            time.sleep(0.1)
    finally:
        server.stop()
        receiver.close()

    spans = receiver.spans()
    (stream,) = [s for s in spans if s["name"] == "chat traced"]
    assert (stream["traceId"], stream["parentSpanId"], stream["kind"]) == (TRACE_ID, CLIENT_SPAN, 2)
    a = attrs(stream)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "traced" and a["gen_ai.response.model"] == upstream
    assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.system"] == "openai"
    assert a["gen_ai.usage.output_tokens"] > 0 and a["gen_ai.usage.input_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert 0 < a["gen_ai.server.time_to_first_token"] < 10 and a["llmproxy.attempts"] == 2
    assert int(stream["endTimeUnixNano"]) > int(stream["startTimeUnixNano"])

    attempts = sorted((s for s in spans if s["name"] == f"chat {upstream}"), key=lambda s: int(s["startTimeUnixNano"]))
    assert len(attempts) == 2
    assert all(s["traceId"] == TRACE_ID and s["parentSpanId"] == stream["spanId"] and s["kind"] == 3 for s in attempts)
    assert attrs(attempts[0]).get("error.type") == "attempt_failed" and attempts[0]["status"]["code"] == 2
    assert "error.type" not in attrs(attempts[1])

    sent = [q["headers"].get("traceparent") for q in provider_requests(fake, "traced-on")]
    assert sent == [f"00-{TRACE_ID}-{s['spanId']}-01" for s in attempts]  # each attempt its own parent

    exported = b"".join(receiver.bodies).decode()
    assert PROMPT not in exported and KEY not in exported


def test_off_by_default_nothing_is_propagated(tmp_path, fake):
    path, _ = config_file(tmp_path, fake, "traced-off")
    server = start_server("--config", str(path), env={"TRACING_KEY": KEY})
    try:
        run_stream(server.address, (("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),))
    finally:
        server.stop()
    sent = provider_requests(fake, "traced-off")
    assert len(sent) == 2 and all("traceparent" not in q["headers"] for q in sent)


def test_trace_context_from_a_websocket_handshake_and_an_http_request_is_the_streams_parent(tmp_path, fake):
    import asyncio

    import httpx

    from tests.support.procs import start_bridge
    from tests.support.ws import collect, open_ws, send, start_frame

    receiver = Receiver()
    path, _ = config_file(tmp_path, fake, "traced-relay")
    server = start_server("--config", str(path), "--otlp-endpoint", receiver.url, env={"TRACING_KEY": KEY})
    bridge = start_bridge(server.address, "--http-port", "0")
    ws_span, http_span = "1111111111111111", "2222222222222222"
    try:
        async def over_websocket() -> None:
            headers = {"traceparent": f"00-{TRACE_ID}-{ws_span}-01"}
            async with open_ws(bridge.address, additional_headers=headers) as ws:
                await send(ws, start_frame("w", PROMPT, model="traced"))
                assert (await collect(ws, {"w"}))["w"][-1]["type"] == "done"

        asyncio.run(over_websocket())
        http_url = next(line.split(" on ", 1)[1].strip() for line in bridge.lines if line.startswith("llmproxy-bridge http on "))
        answer = httpx.post(
            f"{http_url}/v1/chat/completions",
            json={"model": "traced", "messages": [{"role": "user", "content": PROMPT}]},
            headers={"traceparent": f"00-{TRACE_ID}-{http_span}-01"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 20
        while len([s for s in receiver.spans() if s["name"] == "chat traced"]) < 2:
            assert time.monotonic() < deadline, receiver.spans()
            time.sleep(0.1)
    finally:
        bridge.stop()
        server.stop()
        receiver.close()
    parents = {s["parentSpanId"] for s in receiver.spans() if s["name"] == "chat traced" and s["traceId"] == TRACE_ID}
    assert parents == {ws_span, http_span}
