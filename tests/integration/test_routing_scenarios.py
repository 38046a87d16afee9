"""Routing scenarios through the whole chain: WebSocket -> bridge -> server -> fake OpenAI.

One fake OpenAI process serves every deployment; each deployment's upstream model string
carries the fake's knobs (and a `tag` that makes it unique), so `GET /_fake/state` counts the
upstream attempts of each scenario by model string. Each scenario states the client-visible
outcome and the number of upstream attempts.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter

import pytest
from websockets.asyncio.client import connect

from tests.fakes.base import generated_tokens
from tests.support.procs import start, start_proxy
from tests.support.ws import collect, send

FAST_RETRY = {"max_attempts": 3, "backoff_base_s": 0.02, "backoff_max_s": 0.2, "deadline_s": 5}

# public model -> (deployments [(upstream model, weight, timeouts)], routing keys)
MODELS: dict[str, tuple[list[tuple[str, float, dict | None]], dict]] = {
    "r429": ([("m@status=429,times=1,tag=r429", 1, None)], {}),
    "r429-ra": ([("m@status=429,retry_after=1,times=1,tag=r429ra", 1, None)], {}),
    "r429-long": ([("m@status=429,retry_after=30,tag=r429long", 1, None)], {}),
    "r500-once": ([("m@status=500,times=1,tag=r500", 1, None)], {}),
    "r503": ([("m@status=503,tag=r503", 1, None)], {}),
    "reset": ([("m@tokens=10,reset=0,tag=reset", 1, None)], {"fallbacks": ["ok-reset"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "ok-reset": ([("m@tokens=10,tag=okreset", 1, None)], {}),
    "hang": ([("m@hang,tag=hang", 1, {"first_token_s": 0.3})], {"fallbacks": ["ok-hang"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "ok-hang": ([("m@tokens=10,tag=okhang", 1, None)], {}),
    "slow": ([("m@tokens=10,ttft=3,tag=slow", 1, {"first_token_s": 0.3})], {"fallbacks": ["ok-slow"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "ok-slow": ([("m@tokens=10,tag=okslow", 1, None)], {}),
    "cut": ([("m@tokens=60,cut=40,tag=cut", 1, None)], {}),
    "cut-cont": ([("m@tokens=60,cut=40,tag=cutcont", 1, None)],
                 {"after_first_token": "continue", "fallbacks": ["cont-b"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "cont-b": ([("m@tokens=10,offset=35,tag=contb", 1, None)], {}),
    "stall": ([("m@tokens=60,stall=20,tag=stall", 1, {"stall_s": 0.3})], {}),
    "malformed": ([("m@tokens=10,malformed=0,times=1,tag=malformed", 1, None)], {}),
    "no-done": ([("m@tokens=5,no_done,tag=nodone", 1, None)], {}),
    "context": ([("m@status=400,code=context_length_exceeded,tag=ctx", 1, None)], {"fallbacks": ["context-ok"]}),
    "context-ok": ([("m@tokens=5,tag=ctx2", 1, None)], {}),
    "filter": ([("m@status=400,code=content_filter,tag=filter", 1, None)], {"fallbacks": ["filter-ok"]}),
    "filter-ok": ([("m@tokens=5,tag=filter2", 1, None)], {}),
    "flap": ([("m@tokens=5,status=500,times=1,period=2,tag=flap", 1, None)], {"fallbacks": ["flap-b"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "flap-b": ([("m@tokens=5,tag=flapb", 1, None)], {}),
    "fb-a": ([("m@status=503,tag=fba", 1, None)], {"fallbacks": ["fb-b"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "fb-b": ([("m@status=503,tag=fbb", 1, None)], {}),
    "brk": ([("m@tokens=3,status=500,times=3,tag=brk", 1, None)],
            {"retry": {**FAST_RETRY, "max_attempts": 1}, "breaker": {"failures": 3, "cooldown_s": 0.5}}),
}


@pytest.fixture(scope="module")
def fake():
    proc = start("fake-openai", ["tests.fakes.openai", "--port", "0"], "fake-openai listening on ")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def chain(fake, tmp_path_factory):
    # The scenarios are a storm of failures by themselves: a roomy budget keeps them apart; the
    # storm test runs on a server of its own with the default budget.
    config: dict = {"routing": {"retry": FAST_RETRY, "budget": {"min_concurrent": 50}}, "models": {}}
    for public, (deployments, routing) in MODELS.items():
        listed = []
        for i, (model, weight, timeouts) in enumerate(deployments):
            d = {"name": f"{public}-{i + 1}", "provider": "openai", "model": model, "weight": weight,
                 "base_url": f"http://{fake.address}/v1", "key": "env:ROUTING_KEY"}
            if timeouts:
                d["timeouts"] = timeouts
            listed.append(d)
        config["models"][public] = {**routing, "deployments": listed}
    path = tmp_path_factory.mktemp("routing") / "llmproxy.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    proxy = start_proxy(("--config", str(path), "--max-streams", "100"), (), {"ROUTING_KEY": "sk-routing-test"})
    yield proxy
    proxy.stop()


def counts_by_tag(fake) -> Counter:
    with urllib.request.urlopen(f"http://{fake.address}/_fake/state", timeout=5) as r:
        state = json.loads(r.read())
    out: Counter = Counter()
    for req in state["requests"]:
        model = json.loads(req["body"] or "{}").get("model", "")
        for knob in model.partition("@")[2].split(","):
            if knob.startswith("tag="):
                out[knob[4:]] += 1
    return out


async def run(chain, model: str, n: int = 1, timeout_s: float = 20) -> list[list[dict]]:
    """`n` concurrent streams of `model` on one connection; their frames, in stream order."""
    async with connect(chain.ws_url) as ws:
        for i in range(n):
            await send(ws, {"type": "start", "id": f"s{i}", "model": model, "messages": [{"role": "user", "content": "hi"}]})
        frames = await collect(ws, {f"s{i}" for i in range(n)}, timeout_s=timeout_s)
    return [frames[f"s{i}"] for i in range(n)]


def text(frames) -> str:
    return "".join(f["token"] for f in frames if f["type"] == "token")


def outcome(frames) -> dict:
    last = frames[-1]
    assert last["type"] in ("done", "error"), last
    if last["type"] == "done":
        assert not any(f["type"] == "error" for f in frames)
    return last


def words(n: int, offset: int = 0) -> str:
    return "".join(generated_tokens(n, offset))


# -- scenarios -----------------------------------------------------------------------------------


async def test_429_without_retry_after_is_retried_invisibly(chain, fake):
    (frames,) = await run(chain, "r429")
    assert outcome(frames)["type"] == "done" and outcome(frames)["deployment"] == "r429-1"
    assert [f["type"] for f in frames].count("started") == 1
    assert counts_by_tag(fake)["r429"] == 2


async def test_429_with_retry_after_waits_that_long(chain, fake):
    t0 = time.monotonic()
    (frames,) = await run(chain, "r429-ra")
    assert outcome(frames)["type"] == "done"
    assert time.monotonic() - t0 >= 0.95, "the retry came before retry-after"
    assert counts_by_tag(fake)["r429ra"] == 2


async def test_429_with_retry_after_beyond_the_deadline_fails_at_once(chain, fake):
    t0 = time.monotonic()
    (frames,) = await run(chain, "r429-long")
    error = outcome(frames)
    assert error["type"] == "error" and error["code"] == "rate_limited" and error["retry_after_ms"] == 30000
    assert time.monotonic() - t0 < 3
    assert counts_by_tag(fake)["r429long"] == 1


async def test_500_once_is_retried(chain, fake):
    (frames,) = await run(chain, "r500-once")
    assert outcome(frames)["type"] == "done" and text(frames)
    assert counts_by_tag(fake)["r500"] == 2


async def test_persistent_503_fails_after_max_attempts(chain, fake):
    (frames,) = await run(chain, "r503")
    error = outcome(frames)
    assert error["type"] == "error" and error["code"] == "overloaded"
    assert counts_by_tag(fake)["r503"] == 3


@pytest.mark.parametrize("model, tag, fallback", [("reset", "reset", "okreset"), ("hang", "hang", "okhang"), ("slow", "slow", "okslow")])
async def test_failure_before_the_first_token_fails_over_invisibly(chain, fake, model, tag, fallback):
    (frames,) = await run(chain, model)
    done = outcome(frames)
    assert done["type"] == "done" and done["deployment"] == f"ok-{model}-1"
    assert text(frames) == words(10)
    started = [f for f in frames if f["type"] == "started"]
    assert len(started) == 1 and started[0]["deployment"] == f"ok-{model}-1"
    counts = counts_by_tag(fake)
    assert (counts[tag], counts[fallback]) == (1, 1)


async def test_cut_after_40_of_60_tokens_is_an_error_with_partial_usage(chain, fake):
    (frames,) = await run(chain, "cut")
    error = outcome(frames)
    assert error["type"] == "error" and error["code"] == "upstream_error" and "usage" in error
    assert text(frames) == words(40)
    assert counts_by_tag(fake)["cut"] == 1


async def test_cut_after_40_of_60_tokens_continues_without_repeating(chain, fake):
    (frames,) = await run(chain, "cut-cont")
    done = outcome(frames)
    assert done["type"] == "done"
    # the continuation repeated words 35..39; the client sees each word once
    assert text(frames) == words(45)
    # one frame marks the switch, between the last token of the first attempt and the next
    kinds = [f["type"] for f in frames]
    switch = kinds.index("failover")
    assert kinds.count("failover") == 1 and frames[switch]["deployment"] == done["deployment"]
    assert "".join(f["token"] for f in frames[:switch]) == words(40)
    counts = counts_by_tag(fake)
    assert (counts["cutcont"], counts["contb"]) == (1, 1)
    with urllib.request.urlopen(f"http://{fake.address}/_fake/state", timeout=5) as r:
        bodies = [json.loads(q["body"]) for q in json.loads(r.read())["requests"] if "tag=contb" in q["body"]]
    messages = bodies[-1]["messages"]
    assert messages[-2] == {"role": "assistant", "content": words(40)} and messages[-1]["role"] == "user"


async def test_stall_after_20_tokens_is_a_timeout_with_partial_usage(chain, fake):
    (frames,) = await run(chain, "stall")
    error = outcome(frames)
    assert error["type"] == "error" and error["code"] == "timeout" and "usage" in error
    assert text(frames) == words(20)
    assert counts_by_tag(fake)["stall"] == 1


async def test_malformed_chunk_before_the_first_token_is_retried(chain, fake):
    (frames,) = await run(chain, "malformed")
    assert outcome(frames)["type"] == "done" and text(frames) == words(10)
    assert counts_by_tag(fake)["malformed"] == 2


async def test_missing_done_is_never_reported_as_finished(chain, fake):
    (frames,) = await run(chain, "no-done")
    error = outcome(frames)
    assert error["type"] == "error" and error["code"] == "upstream_error"
    assert text(frames) == words(5)
    assert counts_by_tag(fake)["nodone"] == 1


@pytest.mark.parametrize("model, tag, code", [("context", "ctx", "context_length_exceeded"), ("filter", "filter", "content_filtered")])
async def test_non_retryable_errors_reach_the_client_after_one_attempt(chain, fake, model, tag, code):
    (frames,) = await run(chain, model)
    error = outcome(frames)
    assert error["type"] == "error" and error["code"] == code and error["message"]
    counts = counts_by_tag(fake)
    assert (counts[tag], counts[f"{tag}2"]) == (1, 0), "no retry, no fallback"


async def test_flapping_primary_every_request_is_answered(chain, fake):
    served = []
    for _ in range(6):
        (frames,) = await run(chain, "flap")
        done = outcome(frames)
        assert done["type"] == "done" and text(frames) == words(5)
        served.append(done["deployment"])
    counts = counts_by_tag(fake)
    print(f"\nflapping primary: served by {served}; attempts primary={counts['flap']} fallback={counts['flapb']}")
    assert served == ["flap-b-1", "flap-1"] * 3
    assert (counts["flap"], counts["flapb"]) == (6, 3)


async def test_fallback_that_also_fails(chain, fake):
    (frames,) = await run(chain, "fb-a")
    error = outcome(frames)
    assert error["type"] == "error" and error["code"] == "overloaded"
    counts = counts_by_tag(fake)
    # fb-a allows 1 attempt; its fallback fb-b keeps its own retry policy (3 attempts)
    assert (counts["fba"], counts["fbb"]) == (1, 3)


# -- figures -------------------------------------------------------------------------------------


async def test_429_storm_is_not_amplified(fake, tmp_path):
    config = {"routing": {"retry": FAST_RETRY}, "models": {"storm": {
        "provider": "openai", "model": "m@status=429,tag=storm", "base_url": f"http://{fake.address}/v1", "key": "env:ROUTING_KEY",
        "breaker": {"failures": 100000, "min_requests": 100000}}}}  # the budget alone, not the breaker
    path = tmp_path / "storm.yaml"
    path.write_text(json.dumps(config))
    storm_chain = start_proxy(("--config", str(path), "--max-streams", "100"), (), {"ROUTING_KEY": "sk-routing-test"})
    n = 100
    try:
        results = await asyncio.gather(*(run(storm_chain, "storm", 25, timeout_s=30) for _ in range(n // 25)))
    finally:
        storm_chain.stop()
    frames = [f for group in results for f in group]
    assert all(outcome(f)["code"] == "rate_limited" for f in frames)
    ratio = counts_by_tag(fake)["storm"] / n
    print(f"\n429 storm: {n} client requests, upstream attempts / client requests = {ratio:.2f}")
    assert ratio <= 1.2


async def test_breaker_opens_and_closes_as_configured(chain, fake):
    codes = [outcome((await run(chain, "brk"))[0])["code"] for _ in range(2)]
    opened = time.monotonic()  # no later than the breaker opens, on the third failure
    codes.append(outcome((await run(chain, "brk"))[0])["code"])
    assert codes == ["upstream_error"] * 3 and counts_by_tag(fake)["brk"] == 3
    (frames,) = await run(chain, "brk")  # open: refused without an upstream attempt
    error = outcome(frames)
    assert error["code"] == "overloaded" and "circuit" in error["message"]
    assert counts_by_tag(fake)["brk"] == 3
    # Cooldown 0.5 s: refused until then, then half-open and one probe, which succeeds. Poll
    # (each refusal costs no upstream attempt) instead of sleeping past the cooldown.
    while outcome(frames)["type"] != "done":
        assert outcome(frames)["code"] == "overloaded", outcome(frames)
        assert time.monotonic() - opened < 5, "the breaker never let a probe through"
        await asyncio.sleep(0.05)
        (frames,) = await run(chain, "brk")
    probed_after = time.monotonic() - opened
    assert probed_after >= 0.5, f"a probe went through {probed_after * 1000:.0f} ms after opening, inside the 0.5 s cooldown"
    for _ in range(2):
        (frames,) = await run(chain, "brk")
        assert outcome(frames)["type"] == "done"
    print(f"\nbreaker: opened after 3 failures (request 4 refused, 0 attempts), closed by the probe after {probed_after:.2f} s (cooldown 0.5 s);"
          f" upstream attempts {counts_by_tag(fake)['brk']} for 7 requests")
    assert counts_by_tag(fake)["brk"] == 6


async def test_weighted_routing_follows_the_weights(fake, tmp_path):
    # A server of its own with a seeded router: every choice is one draw from random.Random(5),
    # whatever ran before and in whatever order the 50 concurrent requests arrive, so the share
    # is the same on every run (the unit test in tests/unit/routing checks the draw itself).
    config = {"models": {"weighted": {"deployments": [
        {"name": f"w{weight}", "provider": "openai", "model": f"m@tokens=1,tag=w{weight}", "weight": weight,
         "base_url": f"http://{fake.address}/v1", "key": "env:ROUTING_KEY"}
        for weight in (3, 1)]}}}
    path = tmp_path / "weighted.yaml"
    path.write_text(json.dumps(config))
    weighted_chain = start_proxy(("--config", str(path), "--max-streams", "100", "--routing-seed", "5"), (), {"ROUTING_KEY": "sk-routing-test"})
    n = 400
    try:
        for _ in range(n // 50):
            results = await run(weighted_chain, "weighted", 50)
            assert all(outcome(f)["type"] == "done" for f in results)
    finally:
        weighted_chain.stop()
    counts = counts_by_tag(fake)
    share = counts["w3"] / (counts["w3"] + counts["w1"])
    print(f"\nweighted 3:1 over {n} requests through the chain: {share:.3f} to the weight-3 deployment (expected 0.750)")
    assert counts["w3"] + counts["w1"] == n
    assert abs(share - 0.75) <= 0.07
