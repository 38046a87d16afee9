"""How right the semantic cache is: precision and recall on a labelled set of prompt pairs.

    python -m server.cache.quality [--pairs tests/data/semantic_pairs.jsonl] [--embeddings local]
    python -m server.cache.quality --embeddings openai --base-url URL --model M --key env:NAME

A pair is a hit when the prompts' cosine similarity reaches the threshold and (unless
--no-guard) the near-miss guard agrees (guard.py). Precision: hits that are paraphrases among all
hits; recall: paraphrases that hit; false hits: near misses that hit, among all near misses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from server.cache.cache import DEFAULT_THRESHOLD
from server.cache.embeddings import build_embedder
from server.cache.guard import same_specifics

THRESHOLDS = (0.60, 0.70, 0.75, DEFAULT_THRESHOLD, 0.85, 0.90, 0.95)


async def scores(pairs: list[dict[str, object]], section: dict[str, object]) -> list[float]:
    import os

    embedder = build_embedder(section, os.environ, "--embeddings")
    cache: dict[str, tuple[float, ...]] = {}
    out = []
    for pair in pairs:
        vectors = []
        for text in (str(pair["a"]), str(pair["b"])):
            if text not in cache:
                cache[text] = await embedder.embed(text)
            vectors.append(cache[text])
        out.append(sum(x * y for x, y in zip(*vectors)))
    return out


def table(pairs: list[dict[str, object]], sims: list[float], guard: bool) -> list[tuple[float, float, float, float]]:
    rows = []
    negatives = sum(1 for p in pairs if p["label"] == 0) or 1
    positives = len(pairs) - negatives or 1
    for t in THRESHOLDS:
        tp = fp = 0
        for pair, s in zip(pairs, sims):
            hit = s >= t and (not guard or same_specifics(str(pair["a"]), str(pair["b"])))
            if hit and pair["label"] == 1:
                tp += 1
            elif hit:
                fp += 1
        precision = tp / (tp + fp) if tp + fp else 1.0
        rows.append((t, precision, tp / positives, fp / negatives))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="tests/data/semantic_pairs.jsonl")
    parser.add_argument("--embeddings", default="local", help="local | openai | gemini")
    parser.add_argument("--base-url")
    parser.add_argument("--model")
    parser.add_argument("--key", help="env:NAME or file:/path")
    args = parser.parse_args(argv)
    pairs = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    section: dict[str, object] = {"provider": args.embeddings}
    for name in ("base_url", "model", "key"):
        if getattr(args, name):
            section[name] = getattr(args, name)
    sims = asyncio.run(scores(pairs, section))
    print(f"{len(pairs)} pairs ({sum(1 for p in pairs if p['label'] == 1)} paraphrases), embeddings: {args.embeddings}")
    for guard in (True, False):
        print(f"\n{'with' if guard else 'without'} the near-miss guard")
        print(f"{'threshold':>9} {'precision':>9} {'recall':>7} {'false hits':>10}")
        for t, p, r, f in table(pairs, sims, guard):
            mark = "  <- default" if t == DEFAULT_THRESHOLD else ""
            print(f"{t:>9.2f} {p:>9.3f} {r:>7.3f} {f:>9.1%}{mark}")


if __name__ == "__main__":
    main()
