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
