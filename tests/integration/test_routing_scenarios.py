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
    # issue 19: continue mode, each with a fallback; the primary keeps the default 3 attempts
    "stall-cont": ([("m@tokens=60,stall=20,tag=stallcont", 1, {"stall_s": 0.5})],
                   {"after_first_token": "continue", "fallbacks": ["cont-s"]}),
    "cont-s": ([("m@tokens=45,offset=15,tag=conts", 1, None)], {}),
    "malformed-cont": ([("m@tokens=60,malformed=30,tag=malcont", 1, None)], {"after_first_token": "continue", "fallbacks": ["cont-m"]}),
    "cont-m": ([("m@tokens=44,offset=16,tag=contm", 1, None)], {}),
    "nodone-cont": ([("m@tokens=20,no_done,tag=nodonecont", 1, None)], {"after_first_token": "continue", "fallbacks": ["cont-nd"]}),
    "cont-nd": ([("m@tokens=5,tag=contnd", 1, None)], {}),
    "cut-cont2": ([("m@tokens=60,cut=40,tag=cutcont2", 1, None)], {"after_first_token": "continue", "fallbacks": ["cont-c"]}),
    # the generated words repeat every 17: a repeat longer than the true one must not fit the
    # partial answer, or the overlap is ambiguous (the continuations repeat 24 and 14 words)
    "cont-c": ([("m@tokens=44,offset=16,tag=contc", 1, None)], {}),
    "r429-fb": ([("m@status=429,retry_after=1,tag=r429fb", 1, None)], {"fallbacks": ["ok-429"]}),
    "ok-429": ([("m@tokens=5,tag=ok429", 1, None)], {}),
    "brk429": ([("m@status=429,retry_after=30,tag=brk429", 1, None)],
               {"retry": {**FAST_RETRY, "max_attempts": 1}, "breaker": {"failures": 1, "cooldown_s": 5}}),
    "drop": ([("m@tokens=5,drop_request,times=1,tag=drop", 1, None)], {"fallbacks": ["drop-b"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "drop-b": ([("m@tokens=5,tag=dropb", 1, None)], {}),
    "warm": ([("m@tokens=1,tag=warm", 1, None)], {}),
    "ops": ([("m@tokens=3,status=500,times=1,tag=ops", 1, None)], {"fallbacks": ["ops-b"], "retry": {**FAST_RETRY, "max_attempts": 2}}),
    "ops-b": ([("m@tokens=3,tag=opsb", 1, None)], {}),
    # each attempt's usage in done / error: a primary cut at 40 continued on a fallback that
    # finishes (parts-b) or is cut too (parts-e: its 30 words repeat 24 of the answer, add 6)
    "parts": ([("m@tokens=60,cut=40,tag=parts", 1, None)],
              {"after_first_token": "continue", "fallbacks": ["parts-b"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "parts-b": ([("m@tokens=44,offset=16,tag=partsb", 1, None)], {}),
    "parts-cut": ([("m@tokens=60,cut=40,tag=partscut", 1, None)],
                  {"after_first_token": "continue", "fallbacks": ["parts-e"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "parts-e": ([("m@tokens=44,offset=16,cut=30,tag=partse", 1, None)], {"retry": {**FAST_RETRY, "max_attempts": 1}}),
    "parts-one": ([("m@tokens=60,cut=40,tag=partsone", 1, None)], {"retry": {**FAST_RETRY, "max_attempts": 1}}),
    # the dashboard's counters: a retry on dash-1, a failover from dash-fo-1, a continuation from dash-cut-1
    "dash": ([("m@tokens=3,status=500,times=1,tag=dash", 1, None)], {"retry": {**FAST_RETRY, "max_attempts": 2}}),
    "dash-fo": ([("m@status=503,tag=dashfo", 1, None)], {"fallbacks": ["dash-b"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "dash-b": ([("m@tokens=3,tag=dashb", 1, None)], {}),
    "dash-cut": ([("m@tokens=60,cut=40,tag=dashcut", 1, None)],
                 {"after_first_token": "continue", "fallbacks": ["dash-c"], "retry": {**FAST_RETRY, "max_attempts": 1}}),
    "dash-c": ([("m@tokens=44,offset=16,tag=dashc", 1, None)], {}),
    "ops-brk": ([("m@tokens=3,status=500,times=1,tag=opsbrk", 1, None)],
                {"retry": {**FAST_RETRY, "max_attempts": 1}, "breaker": {"failures": 1, "cooldown_s": 1.0}}),
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
    proxy = start_proxy(("--config", str(path), "--max-streams", "100", "--metrics-listen", "127.0.0.1:0"), (), {"ROUTING_KEY": "sk-routing-test"})
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
    # issue 19 finding 6: the attempt that failed before answering counts too
    assert outcome(frames)["timing"]["attempts"] == 2


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
    assert error["usage"]["completion_tokens"] == 40 and error["deployment"] == "cut-1"
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
    # issue 19 finding 1: the usage of both attempts, summed: 40 delivered by the cut attempt
    # (it reported none: its content events count) + the continuation's own 10 (and its prompt)
    assert (done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]) == (14, 50), done["usage"]
    assert done["timing"]["attempts"] == 2
    # the token usage metric carries the same count (the request log's row comes from the same record)
    usage_line = 'gen_ai_client_token_usage_sum{gen_ai_provider_name="openai",gen_ai_request_model="cut-cont",gen_ai_token_type="output"}'
    await wait_for(lambda: usage_line in metrics_text(chain))
    assert f"{usage_line} 50.0" in metrics_text(chain)


def part(deployment: str, prompt: int, completion: int) -> dict:
    return {"deployment": deployment, "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "reasoning_tokens": 0}}


async def test_the_done_of_a_continued_stream_has_the_usage_of_both_attempts(chain, fake):
    (frames,) = await run(chain, "parts")
    done = outcome(frames)
    assert done["type"] == "done" and text(frames) == words(60)
    # the cut attempt reported no usage: its 40 content events; the fallback reported its own
    # 14 + 44 (24 of its words repeated the answer and were not shown, but were generated)
    assert done["attempts"] == [part("parts-1", 0, 40), part("parts-b-1", 14, 44)]
    assert (done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]) == (14, 84)
    assert done["deployment"] == "parts-b-1" and done["timing"]["attempts"] == 2


async def test_an_error_ending_a_continued_stream_has_the_usage_of_both_attempts(chain, fake):
    (frames,) = await run(chain, "parts-cut")
    error = outcome(frames)
    assert error["type"] == "error" and error["code"] == "upstream_error", error
    assert text(frames) == words(46)  # 40, then the 6 new of the fallback's 30
    # neither reported usage: each counts the content events it sent
    assert error["attempts"] == [part("parts-cut-1", 0, 40), part("parts-e-1", 0, 30)]
    assert error["usage"]["completion_tokens"] == 70 and error["deployment"] == "parts-e-1"


async def test_a_stream_served_by_one_attempt_lists_no_attempts(chain, fake):
    (frames,) = await run(chain, "parts-one")  # one attempt, cut: an error with its partial usage
    error = outcome(frames)
    assert error["usage"]["completion_tokens"] == 40 and "attempts" not in error
    (frames,) = await run(chain, "warm")
    assert outcome(frames)["type"] == "done" and "attempts" not in outcome(frames)


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


async def test_missing_done_after_finish_reason_and_usage_is_finished(chain, fake):
    # issue 19 finding 3: the provider signalled the end (finish_reason, then usage): the
    # answer is complete without [DONE], in error mode too (a body cut before that still is an
    # error: test_cut_after_40_of_60_tokens_is_an_error_with_partial_usage)
    (frames,) = await run(chain, "no-done")
    done = outcome(frames)
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert text(frames) == words(5) and done["usage"]["completion_tokens"] == 5
    assert counts_by_tag(fake)["nodone"] == 1


@pytest.mark.parametrize("model, tag, code", [("context", "ctx", "context_length_exceeded"), ("filter", "filter", "content_filtered")])
async def test_non_retryable_errors_reach_the_client_after_one_attempt(chain, fake, model, tag, code):
    (frames,) = await run(chain, model)
    error = outcome(frames)
    assert error["type"] == "error" and error["code"] == code and error["message"]
    counts = counts_by_tag(fake)
    assert (counts[tag], counts[f"{tag}2"]) == (1, 0), "no retry, no fallback"
    # issue 19 finding 6: the frame names the deployment and keeps the provider's reason
    assert error["deployment"] == f"{model}-1" and error["timing"]["attempts"] == 1
    if model == "context":
        assert "128000 tokens" in error["message"], error["message"]


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


@pytest.mark.parametrize("gap_s", [0.0, 0.02])
async def test_429_storm_is_not_amplified(fake, tmp_path, gap_s):
    config = {"routing": {"retry": FAST_RETRY}, "models": {"storm": {
        "provider": "openai", "model": f"m@status=429,tag=storm{gap_s}", "base_url": f"http://{fake.address}/v1", "key": "env:ROUTING_KEY",
        "breaker": {"failures": 100000, "min_requests": 100000}}}}  # the budget alone, not the breaker
    path = tmp_path / "storm.yaml"
    path.write_text(json.dumps(config))
    storm_chain = start_proxy(("--config", str(path), "--max-streams", "100"), (), {"ROUTING_KEY": "sk-routing-test"})
    n = 100
    try:
        if gap_s:  # arrivals gap_s apart (issue 19: a quarter of such storms reached 1.21-1.24)
            async def one(i: int) -> list[list[dict]]:
                await asyncio.sleep(i * gap_s)
                return await run(storm_chain, "storm", 1, timeout_s=30)

            results = await asyncio.gather(*(one(i) for i in range(n)))
        else:
            results = await asyncio.gather(*(run(storm_chain, "storm", 25, timeout_s=30) for _ in range(n // 25)))
    finally:
        storm_chain.stop()
    frames = [f for group in results for f in group]
    assert all(outcome(f)["code"] == "rate_limited" for f in frames)
    ratio = counts_by_tag(fake)[f"storm{gap_s}"] / n
    print(f"\n429 storm (arrivals {gap_s * 1000:g} ms apart): {n} client requests, upstream attempts / client requests = {ratio:.2f}")
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


# -- issue 19: continuation that tells the truth, failures an operator can see --------------------


def continued_at(frames) -> tuple[float, float]:
    """(seconds from the last token before the failover frame to that frame, to the first
    continued token)."""
    kinds = [f["type"] for f in frames]
    switch = kinds.index("failover")
    last = max(f["_t"] for f in frames[:switch] if f["type"] == "token")
    first = next(f["_t"] for f in frames[switch:] if f["type"] == "token")
    return frames[switch]["_t"] - last, first - last


async def test_a_stalled_stream_continues_on_the_fallback_first(chain, fake):
    # finding 2: the primary keeps 3 attempts, but a continuation goes to another deployment
    # first: one failover frame naming the fallback, right after the 0.5 s stall timeout
    before = counts_by_tag(fake)
    (frames,) = await run(chain, "stall-cont")
    done = outcome(frames)
    assert done["type"] == "done" and done["deployment"] == "cont-s-1"
    assert text(frames) == words(60)
    failovers = [f for f in frames if f["type"] == "failover"]
    assert [f["deployment"] for f in failovers] == ["cont-s-1"]
    counts = counts_by_tag(fake) - before
    assert (counts["stallcont"], counts["conts"]) == (1, 1)
    _, to_first = continued_at(frames)
    assert to_first < 0.5 + 1.5, f"{to_first:.2f}s of silence"  # the stall timeout plus a generous margin
    # usage: the stalled attempt's 20 delivered tokens + the continuation's own 45
    assert done["usage"]["completion_tokens"] == 65 and done["timing"]["attempts"] == 2


async def test_a_finished_answer_without_done_is_not_continued(chain, fake):
    # finding 3: finish_reason + usage, no [DONE]: finished; no continuation request
    (frames,) = await run(chain, "nodone-cont")
    done = outcome(frames)
    assert done["type"] == "done" and done["deployment"] == "nodone-cont-1"
    assert text(frames) == words(20) and not any(f["type"] == "failover" for f in frames)
    assert done["usage"]["completion_tokens"] == 20
    counts = counts_by_tag(fake)
    assert (counts["nodonecont"], counts["contnd"]) == (1, 0)
    print(f"\ncontinue/missing [DONE]: frames: started, {len(text(frames).split())} words in"
          f" {[f['type'] for f in frames].count('token')} token frames, done({done['finish_reason']});"
          f" usage {done['usage']['prompt_tokens']}+{done['usage']['completion_tokens']}; attempts {done['timing']['attempts']};"
          f" no continuation")


async def test_a_rate_limited_primary_with_a_ready_fallback_costs_no_waiting(chain, fake):
    # finding 4: Retry-After: 1 on the primary; the fallback answers at once
    t0 = time.monotonic()
    (frames,) = await run(chain, "r429-fb")
    elapsed = time.monotonic() - t0
    done = outcome(frames)
    assert done["type"] == "done" and done["deployment"] == "ok-429-1"
    assert elapsed < 0.9, f"waited {elapsed:.2f}s"
    counts = counts_by_tag(fake)
    assert (counts["r429fb"], counts["ok429"]) == (1, 1)


async def test_an_open_breaker_keeps_the_providers_retry_after(chain, fake):
    # finding 4: the 429's retry-after (30 s) outlives the breaker's cooldown (5 s): the
    # overloaded answer says 30 s, not nothing
    (frames,) = await run(chain, "brk429")
    error = outcome(frames)
    assert error["code"] == "rate_limited" and error["retry_after_ms"] == 30000
    (frames,) = await run(chain, "brk429")
    error = outcome(frames)
    assert error["code"] == "overloaded" and "circuit" in error["message"]
    assert 25000 <= error["retry_after_ms"] <= 30000, error
    assert counts_by_tag(fake)["brk429"] == 1


async def test_a_post_the_upstream_read_is_not_sent_twice(chain, fake):
    # finding 5: the upstream reads the whole request on a kept-alive connection and drops it
    # without an answer; the transport does not send it again on its own: the router fails
    # over (its retry rules), and the upstream saw the request once
    (frames,) = await run(chain, "warm")  # leaves a kept-alive connection to reuse
    assert outcome(frames)["type"] == "done"
    (frames,) = await run(chain, "drop")
    done = outcome(frames)
    assert done["type"] == "done" and done["deployment"] == "drop-b-1" and done["timing"]["attempts"] == 2
    counts = counts_by_tag(fake)
    assert (counts["drop"], counts["dropb"]) == (1, 1)


def metrics_text(chain) -> str:
    line = next(line for line in chain.server.lines if line.startswith("llmproxy-server metrics on "))
    with urllib.request.urlopen(line.rsplit(" ", 1)[1], timeout=5) as r:
        return r.read().decode()


def routing_lines(chain, needle: str) -> list[str]:
    return [line for line in chain.server.lines if "llmproxy.routing" in line and needle in line]


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_failed_attempts_retries_and_failovers_are_logged_once_and_counted(chain, fake):
    # finding 7: ops-1 answers 500 once: a failed attempt, then a retry on ops-1 (max 2)
    (frames,) = await run(chain, "ops")
    assert outcome(frames)["type"] == "done"
    await wait_for(lambda: routing_lines(chain, "event=retry model=ops "))
    failed = routing_lines(chain, "event=attempt_failed model=ops ")
    assert len(failed) == 1 and "deployment=ops-1" in failed[0] and "status=500" in failed[0] and "WARNING" in failed[0]
    assert len(routing_lines(chain, "event=retry model=ops deployment=ops-1")) == 1
    text_ = metrics_text(chain)
    assert 'llmproxy_upstream_attempt_failures_total{code="upstream_error",deployment="ops-1"} 1.0' in text_
    assert 'llmproxy_upstream_retries_total{deployment="ops-1"} 1.0' in text_
    # a failover: fb-a allows one attempt, then fb-b
    (frames,) = await run(chain, "fb-a")
    await wait_for(lambda: routing_lines(chain, "event=failover model=fb-a from=fb-a-1 deployment=fb-b-1"))
    assert 'llmproxy_upstream_failovers_total{deployment="fb-b-1",from_deployment="fb-a-1",kind="failover"}' in metrics_text(chain)


async def test_breaker_opening_and_closing_are_logged_and_its_state_is_in_metrics(chain, fake):
    (frames,) = await run(chain, "ops-brk")
    assert outcome(frames)["code"] == "upstream_error"
    await wait_for(lambda: routing_lines(chain, "event=breaker_open deployment=ops-brk-1"))
    assert 'llmproxy_breaker_state{deployment="ops-brk-1"} 2.0' in metrics_text(chain)
    # after the 1 s cooldown the probe succeeds (the fake fails once only) and closes it
    deadline = time.monotonic() + 10
    while True:
        (frames,) = await run(chain, "ops-brk")
        if outcome(frames)["type"] == "done":
            break
        assert outcome(frames)["code"] == "overloaded" and time.monotonic() < deadline
        await asyncio.sleep(0.2)
    await wait_for(lambda: routing_lines(chain, "event=breaker_closed deployment=ops-brk-1"))
    assert len(routing_lines(chain, "event=breaker_open deployment=ops-brk-1")) == 1
    text_ = metrics_text(chain)
    assert 'llmproxy_breaker_state{deployment="ops-brk-1"} 0.0' in text_
    assert 'llmproxy_breaker_transitions_total{deployment="ops-brk-1",state="closed"} 1.0' in text_


@pytest.mark.parametrize("case, model, cut_tag, fallback_tag, delivered, own", [
    ("cut", "cut-cont2", "cutcont2", "contc", 40, 44),
    ("stall", "stall-cont", "stallcont", "conts", 20, 45),
    ("malformed", "malformed-cont", "malcont", "contm", 30, 44),
])
async def test_continue_mode_figures(chain, fake, case, model, cut_tag, fallback_tag, delivered, own):
    """For the issue's closing note: frames, usage and time to the first continued token."""
    before = counts_by_tag(fake)
    (frames,) = await run(chain, model)
    done = outcome(frames)
    assert done["type"] == "done" and text(frames) == words(60)
    kinds = [f["type"] for f in frames]
    assert kinds.count("failover") == 1 and kinds.count("started") == 1
    to_failover, to_first = continued_at(frames)
    usage = done["usage"]
    assert usage["completion_tokens"] == delivered + own
    counts = counts_by_tag(fake) - before
    assert (counts[cut_tag], counts[fallback_tag]) == (1, 1)
    switch = kinds.index("failover")
    summary = f"started, {len(text(frames[:switch]).split())} words in {switch - 1} token frames, " \
              f"failover({frames[switch]['deployment']}), {len(text(frames[switch:]).split())} words in " \
              f"{len(kinds) - switch - 2} token frames, done({done['finish_reason']})"
    # each attempt's own completion count, as the done frame lists them
    assert sum(p["usage"]["completion_tokens"] for p in done["attempts"]) == usage["completion_tokens"]
    parts = ", ".join(f"{p['deployment']} {p['usage']['completion_tokens']}" for p in done["attempts"])
    print(f"\ncontinue/{case}: frames: {summary}; usage {usage['prompt_tokens']}+{usage['completion_tokens']};"
          f" attempts {done['timing']['attempts']} ({parts}); last token -> failover frame {to_failover * 1000:.0f} ms,"
          f" -> first continued token {to_first * 1000:.0f} ms")


async def stats_until(chain, predicate, timeout_s: float = 20.0) -> dict[str, dict]:
    """Reads the bridge's /stats feed (the dashboard's) until `predicate(rows by deployment)`."""
    deadline = time.monotonic() + timeout_s
    rows: dict[str, dict] = {}
    async with connect(chain.http_url.replace("http://", "ws://") + "/stats") as ws:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the dashboard feed never showed it; last rows: {rows}"
            snapshot = json.loads(await asyncio.wait_for(ws.recv(), remaining))
            rows = {d["name"]: d for d in snapshot["deployments"]}
            if predicate(rows):
                return rows


def routing_counts(row: dict | None) -> tuple[int, int, int, int]:
    if row is None:
        return (0, 0, 0, 0)
    return (row["streams"], row["failed_attempts"], row["retries"], row["failovers"])


async def test_the_dashboard_counts_failed_attempts_retries_and_failovers_per_deployment(chain, fake):
    for model in ("dash", "dash-fo", "dash-cut"):
        (frames,) = await run(chain, model)
        assert outcome(frames)["type"] == "done", (model, frames[-1])
    # (streams, failed attempts, retries, failovers) per deployment, over the last minute
    expected = {
        "dash-1": (1, 1, 1, 0),  # a 500, then retried on itself
        "dash-fo-1": (0, 1, 0, 1),  # a 503, then failed over: it served no stream, and still shows
        "dash-b-1": (1, 0, 0, 0),
        "dash-cut-1": (0, 1, 0, 1),  # cut mid-answer, continued elsewhere
        "dash-c-1": (1, 0, 0, 0),
    }
    rows = await stats_until(chain, lambda rows: all(routing_counts(rows.get(n)) == c for n, c in expected.items()))
    assert rows["dash-fo-1"]["breaker"] == "closed"


@pytest.mark.browser
async def test_the_dashboard_page_shows_the_routing_columns(chain, fake):
    from tests.support.node import run_node
    from tests.support.procs import ROOT

    for model in ("dash-fo", "dash-cut"):
        (frames,) = await run(chain, model)
        assert outcome(frames)["type"] == "done"
    shot = ROOT / "tests" / "artifacts" / "dashboard-routing.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shown = await asyncio.to_thread(run_node, ["tests/browser/dashboard_routing.mjs", chain.http_url, str(shot), "dash-fo-1"], 60)
    header = shown["header"]
    assert header[5:8] == ["failed attempts", "retries", "failovers"], header
    rows = {r[0]["text"]: r for r in shown["rows"]}
    fo = rows["dash-fo-1"]
    assert int(fo[5]["text"]) >= 1 and fo[5]["cls"] == "bad" and int(fo[7]["text"]) >= 1 and fo[7]["cls"] == "warn"
    assert fo[1]["text"] == "openai" and fo[2]["text"] == "0" and fo[4]["text"] == "–"  # no stream of its own, no TTFT
    assert rows["dash-b-1"][5]["text"] == "0" and rows["dash-b-1"][5]["cls"] == ""
    assert int(rows["dash-cut-1"][7]["text"]) >= 1
    assert shot.stat().st_size > 10_000
