"""A short task description made from training examples, for `init="data"`: real-word initialization (Li & Liang's
"table-to-text:") when the user writes no `init_text`.

The description is the words that most training inputs share, in the order they first appear (for E2E its field
names: "name eatType food area ..."), then the words most targets share, then, where the targets take few
distinct short values that repeat (classification), those values. Where no word is shared that widely, the
first input stands in.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from .records import Example

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
MIN_SHARE = 0.5  # a word counts as shared when at least this share of the texts hold it
MAX_LABELS = 10  # at most this many distinct short, repeated targets are labels, listed in the description
MAX_WORDS = 64  # the prefix takes the first P tokens of the text (tiled when shorter), so more would go unused


def describe_task(examples: Sequence[Example]) -> str:
    """The description `init="data"` initializes from (see the module docstring); '' for no examples."""
    if not examples:
        return ""
    sources = [_text(e) for e in examples]
    targets = [e.target for e in examples if e.target]
    words = _shared_words(sources) + _shared_words(targets)
    distinct = list(dict.fromkeys(targets))
    if 1 < len(distinct) <= MAX_LABELS and len(distinct) < len(targets) and all(len(t.split()) <= 3 for t in distinct):
        words += distinct  # repeated short targets: label words
    words = list(dict.fromkeys(words))[:MAX_WORDS]
    if not words:
        return " ".join(WORD.findall(sources[0])[:MAX_WORDS]) or sources[0]
    return " ".join(words)


def _text(example: Example) -> str:
    """The input as words: a conversation's message contents, not its JSON keys."""
    if example.messages:
        return " ".join(str(m.get("content", "")) for m in example.messages)
    return example.source


def _shared_words(texts: Sequence[str]) -> list[str]:
    """Words (as first written) that at least MIN_SHARE of `texts` hold, in the order they first appear."""
    if not texts:
        return []
    holding: Counter[str] = Counter()
    first: dict[str, str] = {}
    for text in texts:
        seen = set()
        for word in WORD.findall(text):
            key = word.lower()
            first.setdefault(key, word)
            seen.add(key)
        holding.update(seen)
    need = MIN_SHARE * len(texts)
    return [word for key, word in first.items() if holding[key] >= need]


def fill_init_text(options: dict, examples: Sequence[Example]) -> dict:
    """`options` with `init_text` (or `prefix.init_text`) derived from `examples` wherever `init` is "data" and no
    text was given; the saved adapter config then records the text it started from."""
    filled = dict(options)
    for init_key in ("init", "prefix.init", "prompt.init"):
        text_key = init_key.replace("init", "init_text")
        text = describe_task(examples)
        if filled.get(init_key) == "data" and not filled.get(text_key) and text:
            filled[text_key] = text
    return filled
