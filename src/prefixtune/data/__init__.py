"""Records -> examples -> token ids -> batches, and the built-in data sets.

    records.py        files (JSONL, CSV, JSON), `hf:NAME`, the built-in sets; references, splits
    prompts.py        the prompt format (plain or chat template) and tokenization
    chat.py           conversational records (messages, prompt/completion) and their ids under the chat template
    describe.py       a task description from training examples (init="data")
    formats.py        the prompt format an adapter was trained with (saved in adapter_config.json)
    hf.py             `hf:NAME[:CONFIG][?data_files=..&split=..&streaming=1&take=N]`: Hugging Face data sets
    batches.py        padded batches: length buckets, a seeded order per epoch
    builtin.py        the built-in sets (e2e, xsum, multiemo): found locally or fetched once
    package_index.py  the package index client builtin.py fetches with
"""

from .batches import batches, prompt_batches
from .chat import end_of_turn_id, stop_ids
from .describe import describe_task, fill_init_text
from .formats import CHAT_TEMPLATE, FORMATS, PLAIN, RAW, PromptFormat, trained_format
from .prompts import IGNORE_INDEX, SEPARATOR, TARGET_PREFIX, EncodedExample, EncodeStats, encode, encode_prompts
from .records import (
    DEFAULT_SPLIT_FRACTIONS,
    SPLIT_FRACTIONS,
    SPLITS,
    Example,
    group_references,
    label_names,
    load_dataset,
    read_records,
    split_examples,
    training_pairs,
)

__all__ = [
    "CHAT_TEMPLATE",
    "FORMATS",
    "PLAIN",
    "RAW",
    "PromptFormat",
    "describe_task",
    "end_of_turn_id",
    "fill_init_text",
    "stop_ids",
    "trained_format",
    "DEFAULT_SPLIT_FRACTIONS",
    "IGNORE_INDEX",
    "SEPARATOR",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "TARGET_PREFIX",
    "EncodeStats",
    "EncodedExample",
    "Example",
    "batches",
    "encode",
    "encode_prompts",
    "group_references",
    "label_names",
    "load_dataset",
    "prompt_batches",
    "read_records",
    "split_examples",
    "training_pairs",
]
