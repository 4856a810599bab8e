"""Two tiny lm-evaluation-harness tasks over a local JSONL file: one `multiple_choice`, one `generate_until`.

Shared by tests/test_serve_eval_clients.py and bench/lm_eval_serve.py, which run lm-eval against the server."""

from __future__ import annotations

import json
from pathlib import Path

CHOICES = [
    {"question": "the cat sat on the", "choices": ["mat", "dog", "park"], "answer": 0},
    {"question": "A coffee shop in the city", "choices": ["centre", "area"], "answer": 1},
    {"question": "The Golden Curry is a family friendly", "choices": ["restaurant", "river", "shop"], "answer": 0},
]
TASKS = {
    "pt_choice": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
    "doc_to_target: answer\nmetric_list:\n  - metric: acc\n",
    "pt_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{choices[answer]}}'\n"
    "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n",
}


def write_tasks(directory: Path) -> Path:
    """The tasks' YAML files and their data in `directory` (the `json` data set builder, its cache there too)."""
    data = directory / "pt.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CHOICES))
    for name, body in TASKS.items():
        head = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {directory / 'cache'}\ntest_split: test\n"
        )
        (directory / f"{name}.yaml").write_text(head + body)
    return directory
