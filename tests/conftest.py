import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*attention mask.*")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama + a byte-level tokenizer, saved like any local model directory (built once per run)."""
    from tiny import tiny
    from tiny_tokenizer import make_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_tokenizer()
    model = tiny("llama-gqa")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


NAMES = ["Blue Spice", "Golden Curry", "Cat Park", "River Mat", "Dog Shop", "Coffee Area"]


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory):
    """names.jsonl: 18 records `name: N` -> `N is a coffee shop.` (6 names x 3), the CLI tests' training set."""
    import json

    path = tmp_path_factory.mktemp("data") / "names.jsonl"
    rows = [{"input": f"name: {n}", "target": f"{n} is a coffee shop."} for n in NAMES for _ in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
