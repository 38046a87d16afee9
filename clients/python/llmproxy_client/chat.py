"""`llmproxy chat`: a terminal client that streams answers with their per-token timing.

Theory of operation. `TokenTimer` is sans-I/O: it is fed each frame of a stream with the
monotonic time it arrived and keeps what the terminal shows (time to first token, the gap
before each token as the client saw it and as the server measured it, tokens per second);
`summary()` freezes that into a `ChatSummary`. The driver, `run_chat`, owns the gRPC client,
the terminal and the signals: it prints each token as it arrives (or, with `per_token`, one
line per token with its gap) and a summary line after the answer.

Ctrl-C while an answer streams cancels that stream (the server closes the provider request)
and prints what was received; the answer ends with finish reason CANCELLED. Ctrl-C at the
prompt, or a second Ctrl-C while the cancel is on its way, leaves. With a prompt on the
command line, one answer is streamed and the exit status is 0, or 130 if it was stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import TextIO

import grpc

from llmproxy.v1 import llmproxy_pb2 as pb
from llmproxy_client.grpc_client import LLMProxyClient, LLMProxyError

EXIT_STOPPED = 130  # the shell's code for "ended by SIGINT"
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TokenTiming:
    """One token as the terminal showed it."""

    text: str
    gap_ms: float  # since the previous token (the first: since the request was sent), client side
    server_gap_ms: float  # the same gap as the server measured it (frame latency_us)


@dataclass(frozen=True)
class ChatSummary:
    """One answer's timing; `finish` is the FinishReason name without its prefix, lower case."""

    tokens: int
    ttft_ms: float | None
    total_ms: float
    tokens_per_s: float
    gap_p50_ms: float | None
    gap_max_ms: float | None
    finish: str
    deployment: str

    def line(self) -> str:
        ttft = "-" if self.ttft_ms is None else f"{self.ttft_ms:.0f} ms"
        gaps = "" if self.gap_p50_ms is None else f" · gap p50 {self.gap_p50_ms:.1f} ms max {self.gap_max_ms:.1f} ms"
        return (
            f"[{self.finish} · {self.deployment or '?'} · ttft {ttft} · {self.tokens} tokens"
            f" · {self.tokens_per_s:.1f} tok/s{gaps} · {self.total_ms:.0f} ms]"
        )


@dataclass
class TokenTimer:
    """Per-token timing of one stream, fed frames and arrival times (seconds, monotonic)."""

    sent_at_s: float
    tokens: list[TokenTiming] = field(default_factory=list)
    first_at_s: float | None = None
    last_at_s: float | None = None
    finish: str = ""
    deployment: str = ""

    def receive_frame(self, frame: pb.ServerFrame, now_s: float) -> TokenTiming | None:
        """Takes one frame; returns the token timing to show when it carried text."""
        kind = frame.WhichOneof("kind")
        if kind == "started":
            self.deployment = frame.started.deployment
        elif kind == "done":
            self.finish = pb.FinishReason.Name(frame.done.finish_reason).removeprefix("FINISH_REASON_").lower()
        elif kind == "token":
            previous = self.last_at_s if self.last_at_s is not None else self.sent_at_s
            timing = TokenTiming(frame.token.text, (now_s - previous) * 1000, frame.token.latency_us / 1000)
            if self.first_at_s is None:
                self.first_at_s = now_s
            self.last_at_s = now_s
            self.tokens.append(timing)
            return timing
        return None

    def summary(self, now_s: float, finish: str | None = None) -> ChatSummary:
        gaps = sorted(t.gap_ms for t in self.tokens[1:])
        span_s = (self.last_at_s or 0.0) - (self.first_at_s or 0.0)
        rate = (len(self.tokens) - 1) / span_s if len(self.tokens) > 1 and span_s > 0 else 0.0
        return ChatSummary(
            tokens=len(self.tokens),
            ttft_ms=None if self.first_at_s is None else (self.first_at_s - self.sent_at_s) * 1000,
            total_ms=(now_s - self.sent_at_s) * 1000,
            tokens_per_s=rate,
            gap_p50_ms=gaps[len(gaps) // 2] if gaps else None,
            gap_max_ms=gaps[-1] if gaps else None,
            finish=finish or self.finish or "unknown",
            deployment=self.deployment,
        )


@dataclass(frozen=True)
class ChatOptions:
    target: str
    model: str
    max_tokens: int | None
    per_token: bool
    api_key: str
    system: str
    prompt: str  # empty: read prompts from the terminal


async def stream_answer(client: LLMProxyClient, messages: list[dict[str, str]], options: ChatOptions, out: TextIO) -> tuple[str, ChatSummary]:
    """Streams one answer to `out`; Ctrl-C cancels it. Returns its text and summary."""
    loop = asyncio.get_running_loop()
    handle = client.stream(model=options.model, messages=messages, max_tokens=options.max_tokens)
    timer = TokenTimer(sent_at_s=loop.time())
    stop_requests = 0

    def on_sigint() -> None:
        nonlocal stop_requests
        stop_requests += 1
        if stop_requests == 1:
            loop.create_task(handle.cancel())
        else:
            reader.cancel()  # the cancel did not come back: leave at once

    async def read() -> None:
        async for frame in handle.frames():
            shown = timer.receive_frame(frame, loop.time())
            if shown is None:
                continue
            if options.per_token:
                out.write(f"{shown.gap_ms:8.1f} ms  (server {shown.server_gap_ms:7.1f} ms)  {shown.text!r}\n")
            else:
                out.write(shown.text)
            out.flush()

    reader = loop.create_task(read())
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        await reader
        finish = None
    except asyncio.CancelledError:
        if stop_requests < 2:
            raise
        finish = "stopped"
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if not options.per_token:
        out.write("\n")
    summary = timer.summary(loop.time(), finish)
    out.write(summary.line() + "\n")
    out.flush()
    return "".join(t.text for t in timer.tokens), summary


async def read_line(stdin: TextIO) -> str:
    """The next line typed; "" at end of input or on Ctrl-C (both leave the chat). Read when
    the terminal has it (add_reader), so no thread is left blocked in readline on exit."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()

    def readable() -> None:
        if not line.done():
            line.set_result(stdin.readline())

    def interrupted() -> None:
        if not line.done():
            line.set_result("")

    fd = stdin.fileno()
    loop.add_reader(fd, readable)
    loop.add_signal_handler(signal.SIGINT, interrupted)
    try:
        return await line
    finally:
        loop.remove_reader(fd)
        loop.remove_signal_handler(signal.SIGINT)


async def run_chat(options: ChatOptions, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    metadata = (("authorization", f"Bearer {options.api_key}"),) if options.api_key else ()
    history: list[dict[str, str]] = [{"role": "system", "content": options.system}] if options.system else []
    async with LLMProxyClient(options.target, metadata=metadata, max_attempts=5) as client:
        try:  # fail fast on a wrong address or key, before the first prompt
            models = await asyncio.wait_for(client.list_models(), CONNECT_TIMEOUT_S)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
            detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else f"no answer in {CONNECT_TIMEOUT_S:.0f} s"
            raise LLMProxyError("unavailable", f"cannot reach {options.target}: {detail}") from exc
        names = [m.name for m in models]
        if options.model not in names:
            raise LLMProxyError("unknown_model", f"{options.model!r} is not served here; models: {', '.join(names)}")
        if options.prompt:
            _, summary = await stream_answer(client, [*history, {"role": "user", "content": options.prompt}], options, out)
            return EXIT_STOPPED if summary.finish in ("cancelled", "stopped") else 0
        while True:
            out.write("you> ")
            out.flush()
            line = await read_line(stdin)
            if not line:
                out.write("\n")
                return 0
            prompt = line.strip()
            if not prompt:
                continue
            history.append({"role": "user", "content": prompt})
            text, summary = await stream_answer(client, history, options, out)
            history.append({"role": "assistant", "content": text})
            if summary.finish == "stopped":
                return EXIT_STOPPED


def main(argv: list[str] | None = None, prog: str = "llmproxy chat") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="*", help="one prompt to answer; none: ask at a prompt, line by line")
    parser.add_argument("--target", default=os.environ.get("LLMPROXY_TARGET", "127.0.0.1:50051"), help="the gRPC server (env LLMPROXY_TARGET)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--system", default="", help="a system message before the conversation")
    parser.add_argument("--per-token", "-t", action="store_true", help="one line per token with its gap, client and server side")
    args = parser.parse_args(argv)
    options = ChatOptions(
        target=args.target,
        model=args.model,
        max_tokens=args.max_tokens,
        per_token=args.per_token,
        api_key=os.environ.get("LLMPROXY_API_KEY", ""),
        system=args.system,
        prompt=" ".join(args.prompt),
    )
    try:
        return asyncio.run(run_chat(options))
    except LLMProxyError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a stream (at the prompt)
        return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="llmproxy-chat"))
