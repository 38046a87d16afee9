"""The near-miss guard of the semantic cache. Pure.

Bag-of-token embeddings score "capital of France" and "capital of Germany", or "with" and
"without", almost as high as true paraphrases. A semantic hit therefore also needs both prompts
to agree on their specifics: the same numbers, the same negations, and the same named entities
(capitalised words not opening a sentence, lower-cased for comparison). A paraphrase keeps its
specifics; a near miss usually changes exactly one of them.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
NEGATIONS = frozenset(
    {
        "not", "no", "never", "none", "nothing", "nobody", "neither", "nor", "without", "cannot",
        "can't", "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't", "weren't", "won't",
        "wouldn't", "shouldn't", "couldn't", "hasn't", "haven't", "hadn't", "mustn't", "avoid",
        "except", "excluding", "unless", "nicht", "kein", "keine", "pas", "jamais", "sans",
    }
)
_NUMBER_WORDS = frozenset(
    {
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million",
        "billion", "first", "second", "third", "fourth", "fifth", "half", "double", "twice",
    }
)
# Words that open questions or are capitalised for other reasons than being names.
_NOT_NAMES = frozenset({"i", "i'm", "i've", "i'd", "i'll"})


def specifics(text: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(numbers, negations, names) of a prompt."""
    numbers = set(_NUMBER.findall(text))
    negations: set[str] = set()
    names: set[str] = set()
    for sentence in re.split(r"(?<=[.!?:;])\s+|\n+", text):
        words = _WORD.findall(sentence)
        for i, word in enumerate(words):
            low = word.lower().replace("’", "'")
            if low in NEGATIONS or low.endswith("n't"):
                negations.add("not" if low.endswith("n't") else low)
            if low in _NUMBER_WORDS:
                numbers.add(low)
            if i > 0 and word[0].isupper() and low not in _NOT_NAMES:
                names.add(low)
    return frozenset(numbers), frozenset(negations), frozenset(names)


def same_specifics(a: str, b: str) -> bool:
    return specifics(a) == specifics(b)
