"""The built-in `demo` provider: real text at a realistic pace, with no upstream and no key.

It answers from a small bundled corpus (server/corpus/answers.txt): the entry whose keywords best
match the last user message, followed by further entries when `max_tokens` asks for more text.
Tokens are words and punctuation with their leading space, as LLM tokenizers emit them. Pacing:
a time to first token, then tokens at a rate with relative jitter, all drawn from a seeded RNG so
a seeded request streams the same tokens at the same gaps every time.

It is also the fake the core's and the chain's tests use: its pace is set per deployment.

Bounds (it needs no key, so every client may reach it): an answer is at most `DemoPace.max_tokens`
tokens however large the request's `max_tokens`, and stop sequences are matched against the
text's last `longest stop - 1` characters plus the new token, so a token costs the same however
long the answer already is.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from importlib import resources

from server.core.events import Finished, FinishReason, ProviderEvent, TextDelta, UsageReport
from server.core.request import CONTINUE_PROMPT, ChatRequest
from server.errors import InvalidRequest
from server.providers.base import DeploymentInfo

_TOKEN_RE = re.compile(r"\s*[A-Za-z0-9]+|\s*[^\sA-Za-z0-9]")
_WORD_RE = re.compile(r"[a-z0-9]+")
PROMPT_CHARS_READ = 4096  # keywords are looked for here: a prompt of megabytes costs the same


@dataclass(frozen=True, slots=True)
class DemoPace:
    """Timing of demo streams. `tokens_per_s` 0 means no pacing (as fast as the loop runs)."""

    ttft_s: float = 0.25
    tokens_per_s: float = 40.0
    jitter: float = 0.3  # relative: each gap is interval * (1 +/- jitter)
    seed: int = 0
    max_tokens: int = 4096  # the longest answer, whatever the request's max_tokens


@dataclass(frozen=True, slots=True)
class CorpusEntry:
    keywords: frozenset[str]
    tokens: tuple[str, ...]


def tokenize(text: str) -> tuple[str, ...]:
    """Splits text into word and punctuation tokens that concatenate back to the text."""
    return tuple(_TOKEN_RE.findall(text))


def load_corpus() -> tuple[CorpusEntry, ...]:
    """Reads the bundled corpus. The first entry named `default` is the fallback answer."""
    text = resources.files("server").joinpath("corpus/answers.txt").read_text("utf-8")
    entries: list[CorpusEntry] = []
    keywords: frozenset[str] | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("== "):
            if keywords is not None:
                entries.append(CorpusEntry(keywords, tokenize(" ".join(lines))))
            keywords, lines = frozenset(line[3:].split()), []
        elif line.strip():
            lines.append(line.strip())
    if keywords is not None:
        entries.append(CorpusEntry(keywords, tokenize(" ".join(lines))))
    return tuple(entries)


def choose_answer(corpus: tuple[CorpusEntry, ...], prompt: str) -> list[CorpusEntry]:
    """Orders the corpus for a prompt: the best keyword match first (the `default` entry when
    nothing matches), then the rest in corpus order."""
    words = set(_WORD_RE.findall(prompt[:PROMPT_CHARS_READ].lower()))
    scored = [(len(entry.keywords & words), -i) for i, entry in enumerate(corpus)]
    best_score, best_neg_i = max(scored)
    if best_score == 0:
        best_neg_i = -next(i for i, e in enumerate(corpus) if "default" in e.keywords)
    first = corpus[-best_neg_i]
    return [first] + [e for e in corpus if e is not first]


def count_prompt_tokens(request: ChatRequest) -> int:
    """An estimate, one token per 4 characters (OpenAI's rule of thumb) and 4 per message:
    tokenizing a prompt of megabytes would stall the event loop for every other client."""
    return sum(len(m.content) // 4 + 4 for m in request.messages)


class DemoBackend:
    """A `Backend` that streams corpus text at `pace`."""

    def __init__(self, info: DeploymentInfo, pace: DemoPace, corpus: tuple[CorpusEntry, ...]):
        self._info = info
        self._pace = pace
        self._corpus = corpus

    @property
    def info(self) -> DeploymentInfo:
        return self._info

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        if request.tools:
            raise InvalidRequest("the demo provider does not support tools")
        messages = request.messages
        skip = ""  # a continuation: the answer so far, which this one goes on from
        if len(messages) >= 2 and messages[-1].content == CONTINUE_PROMPT and messages[-2].role == "assistant":
            skip, messages = messages[-2].content, messages[:-2]
        prompt = next((m.content for m in reversed(messages) if m.role == "user"), "")
        seed = request.seed if request.seed is not None else self._pace.seed
        rng = random.Random(f"{seed}:{prompt}")
        limit = min(request.max_tokens, self._pace.max_tokens) if request.max_tokens is not None else None
        pace = self._pace
        interval = 1.0 / pace.tokens_per_s if pace.tokens_per_s > 0 else 0.0
        yield UsageReport(prompt_tokens=count_prompt_tokens(request))

        await asyncio.sleep(pace.ttft_s)
        emitted = 0
        stops = request.stop
        keep = max((len(s) for s in stops), default=1) - 1  # characters a stop can start before a token
        tail = ""  # the end of the text so far: where a stop ending in the next token can begin
        reason = FinishReason.STOP
        entries = choose_answer(self._corpus, prompt)
        # Without max_tokens the answer is the best entry; with it, further entries follow
        # ("\n\n"-separated) until the limit, like a model that keeps writing.
        tokens = iter(entries[0].tokens) if limit is None else _endless(entries)
        skipped = 0
        if skip:  # the same answer as the first request's, from where the partial one ends
            tokens, skipped = _after(tokens, skip)
        for token in tokens:
            if limit is not None and emitted + skipped >= limit:
                reason = FinishReason.LENGTH
                break
            if emitted and interval:
                await asyncio.sleep(max(0.0, interval * (1 + rng.uniform(-pace.jitter, pace.jitter))))
            elif not interval:
                await asyncio.sleep(0)  # stay cooperative when unpaced
            if stops:
                window = tail + token
                hit = min((window.find(s) for s in stops if s in window), default=-1)
                if hit >= 0:
                    cut = window[len(tail) : hit]
                    if cut:
                        yield TextDelta(cut)
                        emitted += 1
                    break
                tail = window[-keep:] if keep else ""
            yield TextDelta(token)
            emitted += 1
        yield UsageReport(completion_tokens=emitted)
        yield Finished(reason)


def _after(tokens: Iterator[str], partial: str) -> tuple[Iterator[str], int]:
    """`tokens` past those that spell `partial` (and how many they were). A partial answer that
    is not a prefix of this answer is not skipped: the answer starts over (a real model's
    continuation need not repeat, the router strips any overlap)."""
    taken: list[str] = []
    text = ""
    for token in tokens:
        if len(text) >= len(partial):
            return itertools.chain([token], tokens), len(taken)
        text += token
        taken.append(token)
        if not partial.startswith(text):
            return itertools.chain(taken, tokens), 0
    return iter(()), len(taken)


def _endless(entries: list[CorpusEntry]) -> Iterator[str]:
    """The entries one after the other, "\n\n"-separated, cycling; the caller stops."""
    first = True
    while True:
        for entry in entries:
            if not first:
                yield "\n\n"
            first = False
            yield from entry.tokens
