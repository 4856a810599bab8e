"""A short task description made from training examples, for `init="data"`: real-word initialization (Li & Liang's
"table-to-text:") when the user writes no `init_text`.

Structured inputs ("name: Blue Spice, eatType: pub" or "name[Blue Spice], eatType[pub]") are described by their
field names, in the order they first appear ("name eatType area food ..."); free text by the words at least half
of the inputs share. Where the targets are a few short values that repeat (classification), the label words
follow. Where nothing is shared that widely, the first input stands in.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from .records import Example

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
# a field name: at the start or after a comma/semicolon/newline, up to three words, then ':', '[' or '='
FIELD = re.compile(r"(?:^|[,;\n|]\s*)([^\W\d_][\w'’-]*(?: [\w'’-]+){0,2})\s*[:\[=]")
FIELD_SHARE = 0.1  # a field counts when at least this share of the inputs has it (E2E's rarest: ~15%)
FIELD_INPUTS = 0.5  # inputs are structured when at least this share of them has a field
WORD_SHARE = 0.5  # a free-text word counts when at least this share of the inputs holds it
MAX_LABELS = 10  # at most this many distinct short, repeated targets are labels, listed in the description
MAX_WORDS = 64  # the prefix takes the first P tokens of the text (tiled when shorter), so more would go unused


def describe_task(examples: Sequence[Example]) -> str:
    """The description `init="data"` initializes from (see the module docstring); '' for no examples."""
    if not examples:
        return ""
    sources = [_text(e) for e in examples]
    fields = [[m.strip() for m in FIELD.findall(s)] for s in sources]
    if sum(1 for f in fields if f) >= FIELD_INPUTS * len(sources):
        words = _shared(fields, FIELD_SHARE)
    else:
        words = _shared((WORD.findall(s) for s in sources), WORD_SHARE, fold_case=True)
    targets = [e.target for e in examples if e.target]
    distinct = list(dict.fromkeys(targets))
    if 1 < len(distinct) <= MAX_LABELS and len(distinct) < len(targets) and all(len(t.split()) <= 3 for t in distinct):
        words += distinct  # repeated short targets: label words
    words = list(dict.fromkeys(words))[:MAX_WORDS]
    if not words:
        return " ".join(WORD.findall(sources[0])[:MAX_WORDS]) or sources[0]
    return " ".join(words)


def _text(example: Example) -> str:
    """The input as text: a conversation's message contents, not its JSON keys."""
    if example.messages:
        return "\n".join(str(m.get("content", "")) for m in example.messages)
    return example.source


def _shared(items_per_text: Iterable[list[str]], share: float, fold_case: bool = False) -> list[str]:
    """Items (as first written) that at least `share` of the texts hold, in the order they first appear."""
    holding: Counter[str] = Counter()
    first: dict[str, str] = {}
    texts = 0
    for items in items_per_text:
        texts += 1
        keys = set()
        for item in items:
            key = item.lower() if fold_case else item
            first.setdefault(key, item)
            keys.add(key)
        holding.update(keys)
    return [item for key, item in first.items() if holding[key] >= share * texts] if texts else []


NO_TEXT = (
    "init='data' takes its text from the training data, which `prefixtune train` derives; "
    "outside training give init_text (or use init='text')"
)


def fill_init_text(options: dict, examples: Sequence[Example]) -> dict:
    """`options` with `init_text` (or `prefix.init_text`) derived from `examples` wherever `init` is "data" and no
    text was given; the saved adapter config then records the text it started from."""
    filled = dict(options)
    for init_key in ("init", "prefix.init", "prompt.init"):
        text_key = init_key.replace("init", "init_text")
        if filled.get(init_key) == "data" and not filled.get(text_key):
            text = describe_task(examples)
            if text:
                filled[text_key] = text
    return filled
