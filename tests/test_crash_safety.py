"""Crash safety: `prefixtune train` killed with SIGKILL at random moments, and the atomic writes under it.

The trials: two chains (checkpoints every step / every second step) run side by side. Each run of a chain is
the real CLI (`prefixtune.cli.main`, in a process forked from tests/fork_server.py, which has imported torch and
transformers once) on a tiny model saved to disk; it is killed after a random delay (seeded), the run directory
is checked (every adapter and checkpoint on it loads, metrics.jsonl reads, loss.png is whole), and the chain goes
on with `--resume`. A run that finishes before its kill must hold exactly what an uninterrupted run holds: the
same adapter and checkpoint bytes, the same metrics, no temporary files. Figures: docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

import prefixtune
from prefixtune import atomic, cli, peft_format, train
from prefixtune.errors import PrefixTuneError
from prefixtune.methods.registry import build_method
from prefixtune.train import checkpoint
from tiny import tiny

HERE = Path(__file__).parent
SEED = 9  # kill delays: random.Random(SEED + chain number)
KILLS_PER_CHAIN = 12  # two chains: 24 SIGKILL trials
OPTIONS = {"projection_dim": 16, "num_virtual_tokens": 4}
MAX_STEPS = 12
CHAINS = {
    "save-every-1": ["--max-steps", str(MAX_STEPS), "--save-every", "1", "--eval-every", "4"],
    "save-every-2": ["--max-steps", str(MAX_STEPS), "--save-every", "2", "--eval-every", "3"],
}


def _train_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--quiet",
        "train_split=all",
        "eval_split=all",
        "warmup_steps=2",
        "log_every=2",
        *(f"{k}={v}" for k, v in OPTIONS.items()),
        *extra,
    ]


class ForkServer:
    """Client of tests/fork_server.py: start `prefixtune` children, learn when they exit and how."""

    def __init__(self, model_dir: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env["TRANSFORMERS_VERBOSITY"] = "error"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "fork_server.py"), str(model_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        first = self.proc.stdout.readline()
        if json.loads(first or b"{}").get("ready") is not True:
            raise RuntimeError(f"the fork server did not start (exit {self.proc.wait()})")
        self.cond = threading.Condition()
        self.pids: dict[int, int] = {}
        self.exited: dict[int, int] = {}
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            event = json.loads(line)
            with self.cond:
                if "exited" in event:
                    self.exited[event["exited"]] = event["code"]
                else:
                    self.pids[event["id"]] = event["pid"]
                self.cond.notify_all()

    def start(self, argv: list[str], log: Path) -> int:
        with self.cond:
            number, self.next_id = self.next_id, self.next_id + 1
            self.proc.stdin.write((json.dumps({"id": number, "argv": argv, "log": str(log)}) + "\n").encode())
            self.proc.stdin.flush()
            assert self.cond.wait_for(lambda: number in self.pids, timeout=60), "the fork server did not answer"
            return self.pids[number]

    def kill(self, pid: int) -> None:
        with self.cond:  # never signal a pid whose exit was reported: it could belong to another process by now
            if pid not in self.exited:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it exited and was reaped; the exit is on its way from the server
                    pass

    def wait(self, pid: int, timeout: float = 300) -> int:
        with self.cond:
            assert self.cond.wait_for(lambda: pid in self.exited, timeout=timeout), f"child {pid} did not exit"
            return self.exited[pid]

    def close(self) -> None:
        with self.cond:
            for pid in set(self.pids.values()) - set(self.exited):
                os.kill(pid, signal.SIGKILL)
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.name != ".write-test")


def _check_run_dir(out: Path, model_dir: Path) -> dict[str, object]:
    """Everything a killed run left must load. Returns what was there."""
    from prefixtune.models import load_model

    found: dict[str, object] = {}
    if (out / "config.yaml").exists():
        assert isinstance(yaml.safe_load((out / "config.yaml").read_text()), dict)
    found["metrics"] = len(train.read_metrics(out / "metrics.jsonl"))  # a torn last line is left out
    base, tokenizer = load_model(str(model_dir))
    if (out / peft_format.ADAPTER_CONFIG).exists():  # written last: the adapter is complete from then on
        model = prefixtune.load_adapter(base, out, name="check")
        kv = model.adapters["check"].collapsed()
        assert torch.isfinite(kv).all()
        model.detach()
        found["adapter"] = True
    if checkpoint.checkpoint_dir(out) is not None:
        model = build_method("prefix", base, OPTIONS, tokenizer)
        state = checkpoint.load_checkpoint(out, model)
        assert state["step"] >= 1 and all(torch.isfinite(p).all() for p in model.trainable_parameters())
        model.detach()
        found["checkpoint_step"] = state["step"]
    png = out / "loss.png"
    if png.exists():
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[-12:-4] == b"\x00\x00\x00\x00IEND", "torn loss.png"
    return found


def _run_record(out: Path) -> dict[str, object]:
    """What a finished run holds, byte for byte where bytes are deterministic."""
    records = train.read_metrics(out / "metrics.jsonl")
    return {
        "adapter": (out / peft_format.ADAPTER_WEIGHTS).read_bytes(),
        "adapter_config": (out / peft_format.ADAPTER_CONFIG).read_bytes(),
        "checkpoint": (out / checkpoint.CHECKPOINT / checkpoint.TRAINABLE).read_bytes(),
        "metrics": [(r["step"], r.get("loss"), r.get("val_loss"), r.get("lr")) for r in records],
    }


def _chain(number: int, name: str, server: ForkServer, model_dir: Path, data: Path, root: Path) -> dict[str, object]:
    rng = random.Random(SEED + number)
    extra = CHAINS[name]
    logs = root / f"{name}-logs"
    logs.mkdir()

    def run(out: Path, kill_after: float | None) -> tuple[int, float]:
        argv = _train_argv(model_dir, data, out, *extra)
        if (out / "config.yaml").exists():
            argv.append("--resume")
        log = logs / f"{len(list(logs.iterdir()))}.log"
        started = time.monotonic()
        pid = server.start(argv, log)
        if kill_after is not None:
            time.sleep(max(0.0, kill_after - (time.monotonic() - started)))
            server.kill(pid)
        code = server.wait(pid)
        assert code in (0, -signal.SIGKILL), f"{out}: exit {code}\n{log.read_text()[-3000:]}"
        return code, time.monotonic() - started

    reference_dir = root / f"{name}-reference"
    _, full = run(reference_dir, None)
    reference = _run_record(reference_dir)
    _, tail = run(reference_dir, None)  # --resume of a finished run: only the fixed costs; changes nothing
    assert _run_record(reference_dir) == reference
    tail = min(tail, full)
    stats: dict[str, object] = {"chain": name, "run_seconds": round(full, 2), "kills": 0, "finished": 0}
    kills_mid_write, steps_found, attempt, at_step, scale = 0, [], 0, 0, 1.0
    out = root / f"{name}-0"
    while True:
        # a random moment of this run's expected life (fixed costs plus the steps left), a little past it at times;
        # a run whose training is done (the last checkpoint is on disk) is left to finish and is compared
        estimate = tail + (full - tail) * (1 - at_step / MAX_STEPS)
        wanted = stats["kills"] < KILLS_PER_CHAIN and at_step < MAX_STEPS
        kill_after = rng.uniform(0.0, 1.1 * scale * estimate) if wanted else None
        code, seconds = run(out, kill_after)
        if code == -signal.SIGKILL:
            stats["kills"] += 1
            if _temporaries(out):  # killed while writing: a temporary file or checkpoint directory is left
                kills_mid_write += 1
            at_step = _check_run_dir(out, model_dir).get("checkpoint_step", 0)
            steps_found.append(at_step)
            continue
        assert _run_record(out) == reference, f"{out} differs from the uninterrupted run"
        assert _temporaries(out) == [], f"{out}: left {_temporaries(out)}"
        stats["finished"] += 1
        scale = (scale + seconds / estimate) / 2  # the first run pays some one-time costs: learn the real length
        if stats["kills"] >= KILLS_PER_CHAIN:
            break
        attempt, at_step = attempt + 1, 0
        out = root / f"{name}-{attempt}"
    stats.update(kills_mid_write=kills_mid_write, checkpoint_step_after_each_kill=steps_found)
    return stats


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_adapter(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    server = ForkServer(model_dir)
    try:
        with ThreadPoolExecutor(len(CHAINS)) as pool:
            futures = [
                pool.submit(_chain, number, name, server, model_dir, data_file, tmp_path)
                for number, name in enumerate(CHAINS)
            ]
            results = [f.result() for f in futures]
    finally:
        server.close()
    kills = sum(r["kills"] for r in results)
    summary = {"seed": SEED, "kills": kills, "seconds": round(time.monotonic() - started, 1), "chains": results}
    print(f"\nSIGKILL trials: {json.dumps(summary)}")
    assert kills >= 20
    assert all(r["finished"] >= 1 for r in results)


# --- the pieces, one at a time ---


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "adapter_config.json"
    atomic.atomic_write_bytes(target, b"old")

    def failing(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic._atomic(target, failing)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_saved_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    # mkstemp makes 0600 files: an adapter saved through it was unreadable to other users (a server, say)
    old = os.umask(0o022)
    try:
        atomic.atomic_write_bytes(tmp_path / "a.json", b"{}")
        (tmp_path / "plain.json").write_bytes(b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_atomic_save_directory_moves_the_marker_last_and_keeps_old_files_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "lora"

    def write(staging: Path) -> None:
        (staging / "adapter_config.json").write_text("new config")
        (staging / "adapter_model.safetensors").write_text("new weights")
        (staging / "README.md").write_text("new")

    moved: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(Path(b).name), real_replace(a, b)))
    atomic.atomic_save_directory(target, write, last=("adapter_config.json",))
    assert moved[-1] == "adapter_config.json" and len(moved) == 3
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    def failing(staging: Path) -> None:
        (staging / "adapter_model.safetensors").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.atomic_save_directory(target, failing, last=("adapter_config.json",))
    assert (target / "adapter_model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_lora_and_full_save_through_staging(tmp_path: Path) -> None:
    from prefixtune.methods.registry import load_trained

    for method, options in (("lora", {"r": 2}), ("full", {})):
        model = build_method(method, tiny("llama-gqa"), options)
        model.save_trained(tmp_path / method)
        assert [p.name for p in (tmp_path / method).iterdir() if p.name.startswith(".")] == []
        load_trained(tiny("llama-gqa"), tmp_path / method, method)


def test_read_metrics_leaves_out_a_torn_last_line_and_refuses_a_bad_middle_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 2, "loss": 1.5}\n{"step": 4, "loss": 1.2}\n{"step": 6, "lo')
    assert [r["step"] for r in train.read_metrics(path)] == [2, 4]
    path.write_bytes(b'{"step": 2, "loss": 1.5}\n{"step": 4, "lo\n{"step": 6, "loss": 1.0}\n')
    with pytest.raises(PrefixTuneError, match=r"metrics.jsonl:2"):
        train.read_metrics(path)


def test_resume_drops_metrics_logged_after_the_checkpoint_and_a_torn_line(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert cli.main(_train_argv(model_dir, data_file, out, "--max-steps", "4", "--save-every", "2")) == 0
    with open(out / "metrics.jsonl", "a") as f:  # what a run killed after step 6 and mid-append would leave
        f.write(json.dumps({"step": 6, "loss": 9.0}) + '\n{"step": 8, "loss": 1.')
    assert cli.main(_train_argv(model_dir, data_file, out, "--max-steps", "8", "--save-every", "2", "--resume")) == 0
    records = train.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8] and records[2]["loss"] != 9.0
    assert (out / "metrics.jsonl").read_text().endswith("}\n")


def test_resume_before_the_first_checkpoint_starts_again(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert cli.main(_train_argv(model_dir, data_file, straight, "--max-steps", "4")) == 0
    assert cli.main(_train_argv(model_dir, data_file, cut, "--max-steps", "4")) == 0
    # a run killed after writing config.yaml and a log line, before any checkpoint (a demo run has none till the end)
    for name in ("checkpoint", "adapter_config.json", "adapter_model.safetensors", "loss.png"):
        path = cut / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (cut / "metrics.jsonl").write_text('{"step": 2, "loss": 3.0}\n{"st')
    assert cli.main(_train_argv(model_dir, data_file, cut, "--max-steps", "4", "--resume")) == 0
    assert (cut / "adapter_model.safetensors").read_bytes() == (straight / "adapter_model.safetensors").read_bytes()
    assert [r["step"] for r in train.read_metrics(cut / "metrics.jsonl")] == [2, 4]


def test_a_checkpoint_survives_a_crash_in_the_save_after_a_crash_between_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_method("prefix", tiny("llama-gqa"), OPTIONS)
    checkpoint.save_checkpoint(tmp_path, model, {"step": 1})
    # killed between the two renames of a save: only .checkpoint.old is left
    (tmp_path / checkpoint.CHECKPOINT).rename(tmp_path / ".checkpoint.old")
    assert checkpoint.checkpoint_dir(tmp_path) == tmp_path / ".checkpoint.old"
    real_rename = Path.rename

    def crash_before_swap(self: Path, target: Path) -> Path:
        if self.name == ".checkpoint.tmp":
            raise KeyboardInterrupt  # stands for SIGKILL just before the new checkpoint is renamed into place
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_before_swap)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, model, {"step": 2})
    monkeypatch.setattr(Path, "rename", real_rename)
    found = checkpoint.checkpoint_dir(tmp_path)  # before the fix, .old was deleted first: nothing was left
    assert found is not None
    assert checkpoint.load_checkpoint(tmp_path, model)["step"] == 1
    checkpoint.save_checkpoint(tmp_path, model, {"step": 3})
    assert checkpoint.load_checkpoint(tmp_path, model)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.CHECKPOINT]


def test_remove_stale_temp_takes_only_our_temporaries(tmp_path: Path) -> None:
    keep = ["adapter_config.json", ".hidden", "task/adapter_model.safetensors", "notes.tmp"]
    gone = [".adapter_model.safetensors.x1y2.tmp", "task/.adapter_config.json.abc.tmp", ".staging-q.tmp/README.md"]
    for name in keep + gone:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    atomic.remove_stale_temp(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(keep)


# Every place in src/ that writes a file, and why it may do so without going through peft_format.atomic_*: (file, code
# it contains). Anything else that writes (open for writing, write_text/bytes, savefig, save_file, torch.save,
# save_pretrained, json/yaml dump to a file, copyfile) fails this test. In bench/ only the results a script is told
# to write (a path from its arguments) are held to this; its scratch inputs live in temporary directories.
ALLOWED_WRITES = [
    ("atomic.py", "Path(tmp).write_bytes(data)"),  # the atomic writers themselves: into the temporary file
    ("atomic.py", "save_file(tensors, tmp, metadata=metadata)"),
    ("atomic.py", "fig.savefig(buffer, "),  # into memory
    ("checkpoint.py", "save_file(tensors, tmp / TRAINABLE)"),  # into a staging directory, renamed in whole
    ("checkpoint.py", "torch.save(state, tmp / STATE)"),
    ("run_dir.py", 'probe.write_bytes(b"")'),  # a probe of the output directory, deleted at once
    ("run_dir.py", 'with open(metrics_path, "a") as f:'),  # metrics.jsonl is appended; readers skip a torn last line
    ("process.py", 'with open(log_path, "ab") as log:'),  # a worker's log, appended
    ("downloads.py", 'with open(directory / f".{name}.lock", "w") as handle:'),  # a lock file, never read
    ("models.py", 'open(out, "wb") as dst:'),  # into a scratch directory that is renamed in whole
    ("models.py", ".save_pretrained(staged)"),
    ("lora.py", "lambda staging: self.peft_model.save_pretrained(str(staging))"),  # atomic_save_directory
    ("lora_prefix.py", "lambda staging: self.peft_model.save_pretrained(str(staging))"),
    ("full.py", "atomic.atomic_save_directory(directory, self.model.save_pretrained)"),
    ("hf_model.py", "def save_pretrained("),  # the definition; it saves through save_adapter (atomic)
    # Trainer's checkpoint-N directory is written file by file by Trainer itself (optimizer, scheduler, RNG,
    # trainer_state.json); ours adds the adapter (atomic) and what Trainer would have written there, its way:
    ("hf_trainer.py", "model.save_pretrained(output_dir)"),
    ("hf_trainer.py", "tokenizer.save_pretrained(output_dir)"),
    ("hf_trainer.py", "torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))"),
]
WRITES = re.compile(
    r"open\([^)]*['\"][wax]b?\+?['\"]|\.write_(text|bytes)\(|savefig\(|save_file\(|torch\.save\(|"
    r"save_pretrained\(|json\.dump\(|yaml\.(safe_)?dump\([^)]*,\s*\w|copyfile\(|shutil\.copy\("
)


@pytest.mark.parametrize("root", ["src", "bench"])
def test_every_file_write_is_atomic_or_listed(root: str) -> None:
    found = set()
    for path in sorted((HERE.parent / root).rglob("*.py")):
        for line in path.read_text().splitlines():
            code = line.split("#")[0].strip()
            if WRITES.search(code) and not code.startswith(('"', "'")) and (root == "src" or "args." in code):
                found.add((path.name, code))
    unexpected = sorted(
        (name, code) for name, code in found if not any(name == f and part in code for f, part in ALLOWED_WRITES)
    )
    assert unexpected == [], f"write these through prefixtune.atomic (temp file, fsync, rename): {unexpected}"
