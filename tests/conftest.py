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


def _t5_bypasses_attention_interface() -> str | None:
    """Before some transformers 5.x release (5.17 still does it), T5 and mT5 call their own attention instead of
    the AttentionInterface, so `attach` refuses them with our error. The reason where that is so, else None."""
    import transformers

    import prefixtune
    from tiny_seq2seq import tiny_seq2seq

    try:
        prefixtune.attach(tiny_seq2seq("t5"), prefixtune.PrefixConfig(num_virtual_tokens=1, init="random")).detach()
    except prefixtune.PrefixTuneError as e:
        return f"upstream: transformers {transformers.__version__}'s T5 attention bypasses AttentionInterface ({e})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """T5-family tests are expected failures, raising our PrefixTuneError, where transformers' T5 cannot take a
    prefix (strict: once T5 goes through the interface they must pass)."""
    t5_items = [i for i in items if "t5" in i.nodeid.split("::", 1)[-1] and i.nodeid.startswith(T5_MODULES)]
    if not t5_items:
        return
    reason = _t5_bypasses_attention_interface()
    if reason is None:
        return
    from prefixtune import PrefixTuneError

    for item in t5_items:
        item.add_marker(pytest.mark.xfail(reason=reason, raises=PrefixTuneError, strict=True))


T5_MODULES = (
    "tests/test_seq2seq.py",
    "tests/test_peft_golden.py",
    "tests/test_isolation.py",
)
