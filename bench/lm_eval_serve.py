"""lm-evaluation-harness against `prefixtune serve`, both as command lines, end to end; JSON out.

    python bench/lm_eval_serve.py                      # a tiny random Llama + prefix, two tiny local tasks
    python bench/lm_eval_serve.py --tokenizer local    # lm-eval loads the model directory's tokenizer instead

It starts `prefixtune serve --model DIR --adapters DIR --port P` (a subprocess, 127.0.0.1) and runs the exact
command docs/serving.md gives:

    lm_eval --model local-completions --model_args model=ADAPTER,base_url=http://127.0.0.1:P/v1/completions \
        --tasks pt_gen,pt_choice --include_path TASKS --output_path OUT --log_samples

with lm-eval's defaults (token-id prompts, batch size 1): with `--tokenizer server` (default) lm-eval finds
/tokenizer_info and /tokenize by itself; with `--tokenizer local` it gets `tokenizer=DIR,tokenizer_backend=
huggingface`. The tasks: a generate_until and a multiple_choice task over a local JSONL file (no download).
What it prints: the commands, their exit codes and seconds, and lm-eval's metrics. tests/test_serve_eval_clients.py
checks the same run's numbers against the PrefixModel (in-process, where it is faster); this is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import prefixtune
from prefixtune.model import PrefixModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lm_eval_tasks import TASKS, write_tasks  # noqa: E402  # the same two tasks the test runs

CORPUS = [
    "the cat sat on the mat and the dog ran in the park",
    "A coffee shop in the city centre area called Blue Spice.",
    "The Golden Curry is a family friendly restaurant near the river.",
]


def tiny_model(directory: Path, adapters: Path, adapter: str) -> None:
    """A random Llama with a byte-level BPE tokenizer saved as a model directory, and one random prefix."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = tf.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    wrapped = PrefixModel(model)
    wrapped.add_adapter(adapter, prefixtune.PrefixConfig(num_virtual_tokens=5, reparameterize=False, init="random"))
    wrapped.save_adapter(adapters / adapter, adapter)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, server: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"prefixtune serve exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("prefixtune serve did not become healthy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", choices=("server", "local", "both"), default="both")
    parser.add_argument("--keep", metavar="DIR", default=None, help="work in DIR and keep it (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="lm-eval-serve-"))
    for sub in ("model", "adapters", "tasks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tiny_model(root / "model", root / "adapters", "beta")
    write_tasks(root / "tasks")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    bin_dir = Path(sys.executable).parent
    serve = [str(bin_dir / "prefixtune"), "serve", "--model", str(root / "model"), "--adapters", str(root / "adapters"),
             "--port", str(port), "--log-level", "warning"]  # fmt: skip
    report: dict[str, Any] = {
        "lm_eval": version("lm_eval"),
        "prefixtune": version("prefixtune"),
        "python": platform.python_version(),
        "serve_command": " ".join(serve),
        "runs": [],
    }
    server = subprocess.Popen(serve, env=env)
    try:
        wait_healthy(url, server)
        variants = ["server", "local"] if args.tokenizer == "both" else [args.tokenizer]
        for variant in variants:
            model_args = f"model=beta,base_url={url}/v1/completions"
            if variant == "local":
                model_args += f",tokenizer={root / 'model'},tokenizer_backend=huggingface"
            out = root / f"out-{variant}"
            command = [str(bin_dir / "lm_eval"), "--model", "local-completions", "--model_args", model_args,
                       "--tasks", ",".join(sorted(TASKS, reverse=True)), "--include_path", str(root / "tasks"),
                       "--output_path", str(out), "--log_samples"]  # fmt: skip
            began = time.perf_counter()
            run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            entry: dict[str, Any] = {
                "tokenizer": variant,
                "command": " ".join(command),
                "returncode": run.returncode,
                "seconds": round(time.perf_counter() - began, 1),
            }
            results = sorted(out.glob("*/results_*.json"))
            if run.returncode == 0 and results:
                metrics = json.loads(results[-1].read_text())["results"]
                entry["results"] = {task: {k: v for k, v in m.items() if k != "alias"} for task, m in metrics.items()}
                entry["table"] = run.stdout.strip().splitlines()[-5:]
            else:
                entry["stderr_tail"] = run.stderr[-3000:]
            report["runs"].append(entry)
    finally:
        server.terminate()
        server.wait(30)
    report["workdir"] = str(root)
    print(json.dumps(report, indent=2))
    return 0 if all(r["returncode"] == 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
