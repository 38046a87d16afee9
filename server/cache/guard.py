"""The near-miss guard of the semantic cache. Pure.

Bag-of-token embeddings score "capital of France" and "capital of Germany", "boiling point" and
"freezing point", or "with" and "without", almost as high as true paraphrases. A semantic hit
therefore also needs both prompts to agree on their specifics:

- the same numbers, the same negations, the same names (capitalised words not opening a
  sentence, lower-cased for comparison) and the same of who / when / where / why (what, which
  and how are interchangeable in paraphrases; these four are not);
- their content words (stop words dropped, a crude stem: "buildings" ~ "building") differ by at
  most one word, added or dropped, and never by a substitution (one word gone and another come).

A paraphrase re-orders, re-phrases the question words, adds "please" or "city"; a near miss
swaps one word for another. On tests/data/semantic_pairs.jsonl (python -m server.cache.quality)
the guard keeps a local bag-of-words model's false hits under 1 % while half of the paraphrases
still hit; what it cannot see is a swap of order ("dollars to euros" / "euros to dollars").
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


# Function words and question phrasing: a paraphrase changes these freely. Prepositions that
# change meaning ("in water", "for", "with", "without") are not here.
_STOP = frozenset(
    """a an the is are was were be been being do does did i me my you your we our it its this that
    these those of on at to and or but what what's whats which who whom whose when where why how
    can could should would will shall may might must please tell give show let us there here some
    any way just so too also very much many more most have has had get got say s""".split()
)


def _stem(word: str) -> str:
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    for suffix in ("ing", "ed", "es", "s"):
        if len(w) > 4 and w.endswith(suffix):
            return w[: -len(suffix)]
    return w


def content_words(text: str) -> frozenset[str]:
    return frozenset(_stem(w) for w in _WORD.findall(text) if w.lower().replace("’", "'") not in _STOP)


_ASKS = frozenset({"who", "whom", "whose", "when", "where", "why"})


def specifics(text: str) -> tuple[frozenset[str], frozenset[str], frozenset[str], frozenset[str]]:
    """(numbers, negations, names, who/when/where/why) of a prompt."""
    numbers = set(_NUMBER.findall(text))
    negations: set[str] = set()
    names: set[str] = set()
    asks: set[str] = set()
    for sentence in re.split(r"(?<=[.!?:;])\s+|\n+", text):
        words = _WORD.findall(sentence)
        for i, word in enumerate(words):
            low = word.lower().replace("’", "'")
            if low in NEGATIONS or low.endswith("n't"):
                negations.add("not" if low.endswith("n't") else low)
            if low in _NUMBER_WORDS:
                numbers.add(low)
            if low in _ASKS:
                asks.add(low)
            if i > 0 and word[0].isupper() and low not in _NOT_NAMES:
                names.add(low)
    return frozenset(numbers), frozenset(negations), frozenset(names), frozenset(asks)


def same_specifics(a: str, b: str) -> bool:
    if specifics(a) != specifics(b):
        return False
    wa, wb = content_words(a), content_words(b)
    gone, new = wa - wb, wb - wa
    return not (gone and new) and len(gone) + len(new) <= 1
