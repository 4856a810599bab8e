"""`add_serve_arguments` / `run_serve`: the flags, and what run_serve hands to uvicorn (no real model, no port)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import prefixtune.serve as serve
from prefixtune.errors import PrefixTuneError
from serve_fixtures import save_adapters, tiny_llama, tiny_tokenizer

FLAGS = ["--model", "--adapters", "--host", "--port", "--api-key", "--max-batch-size", "--max-queue",
         "--max-model-len", "--served-model-name", "--dtype", "--device", "--force", "--log-level"]  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefixtune serve")
    serve.add_serve_arguments(p)
    return p


def test_every_flag_is_documented() -> None:
    text = parser().format_help()
    for flag in FLAGS:
        assert flag in text
    args = parser().parse_args(["--model", "m"])
    defaults = (args.host, args.port, args.max_batch_size, args.max_queue, args.api_key)
    assert defaults == ("127.0.0.1", 8000, 32, 256, None)


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """run_serve with load_model and uvicorn.run replaced: the app it builds is captured."""
    import uvicorn

    from prefixtune import models

    seen: dict[str, Any] = {"adapters": save_adapters(tiny_llama(), tmp_path / "adapters")}
    monkeypatch.setattr(models, "load_model", lambda name, **kw: (tiny_llama(), tiny_tokenizer()))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    return seen


def test_run_serve_builds_the_app(fake_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIXTUNE_API_KEY", "from-env")
    args = parser().parse_args(["--model", "tiny", "--adapters", str(fake_run["adapters"]), "--port", "8123"])
    assert serve.run_serve(args) == 0
    assert (fake_run["host"], fake_run["port"]) == ("127.0.0.1", 8123)
    with TestClient(fake_run["app"]) as client:
        assert client.get("/v1/models").status_code == 401  # the key came from the environment
        listed = client.get("/v1/models", headers={"Authorization": "Bearer from-env"}).json()["data"]
        assert [m["id"] for m in listed] == ["tiny", "alpha", "beta", "gamma"]


def test_run_serve_refuses_bad_flags(fake_run: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(PrefixTuneError, match="--max-batch-size must be positive"):
        serve.run_serve(parser().parse_args(["--model", "tiny", "--max-batch-size", "0"]))
    with pytest.raises(PrefixTuneError, match="is not a directory"):
        serve.run_serve(parser().parse_args(["--model", "tiny", "--adapters", str(tmp_path / "nowhere")]))
