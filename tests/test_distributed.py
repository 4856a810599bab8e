"""`prefixtune train` on 2 processes (gloo on CPU) through torchrun and accelerate launch: equal to one process with
the same global batch, only process 0 writes, resume across process counts, mismatched processes refused."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from prefixtune import cli, train

NAMES = ["Blue Spice", "Golden Curry", "Cat Park", "River Mat", "Dog Shop", "Coffee Area"]
# 2 processes sum their gradients in another order than 1 (and pad their rows differently): float rounding only.
ATOL = 1e-5
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "names.jsonl"
    rows = [{"input": f"name: {n}", "target": f"{n} is a coffee shop{'.' * i}"} for n in NAMES for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return env


def _torchrun(*args: str) -> list[str]:
    port = str(_free_port())
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port, *args]


def _run(command: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run a launcher; past `timeout` every process it started dumps its threads' stacks (faulthandler, on SIGABRT)
    into the failure message, so that a hang says where it hangs."""
    env = {**_env(), "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torch's elastic agent starts each worker in a session of its own, out of the launcher's group: signal
            # every descendant by pid (workers first, so their stacks come before the launcher's), then the group.
            stuck = psutil.Process(process.pid).children(recursive=True)
            for child in reversed(stuck):
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGABRT)
            os.killpg(process.pid, signal.SIGABRT)
            out, err = process.communicate(timeout=60)
            for child in stuck:  # none may outlive the test (a worker that ignored the signal)
                with contextlib.suppress(psutil.Error):
                    child.kill()
            pytest.fail(f"{command[0]} still running after {timeout} s; the stacks:\n{err[-20000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_a_hung_launch_reports_every_process_stack_and_leaves_none_behind(tmp_path: Path) -> None:
    """The harness itself: a launcher whose worker hangs in a session of its own (as torch's elastic agent starts
    them) fails the test with the worker's stack, and the worker does not outlive it."""
    worker = "import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(600)"
    launcher = (
        f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True).wait()"
    )
    with pytest.raises(pytest.fail.Exception) as failed:
        _run([sys.executable, "-c", launcher], tmp_path, timeout=5)
    assert "still running after 5 s" in str(failed.value)
    assert str(failed.value).count("Current thread") >= 2  # faulthandler's dump of the worker and the launcher
    pid = int((tmp_path / "pid").read_text())
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=10)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _train_args(model_dir: Path, out: Path, *data: str, steps: int | None, batch: int = 3) -> list[str]:
    budget = ["--max-steps", str(steps)] if steps else ["--epochs", "1"]
    return [
        "train",
        "--model",
        str(model_dir),
        *[x for d in data for x in ("--data", d)],
        "--out",
        str(out),
        "--batch-size",
        str(batch),
        *budget,
        "--lr",
        "3e-2",
        "--quiet",
        "train_split=all",
        "grad_accum=2",
        "schedule=constant",  # the learning rate does not depend on max_steps: a run can be extended
        "warmup_steps=1",
        "log_every=1",
        "projection_dim=16",
        "num_virtual_tokens=4",
    ]


def _assert_same(a: Path, b: Path) -> None:
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def two_process_run(model_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 steps on 2 processes: 18 examples, global batch 3 rows (2 + 1 per process), 2 micro-batches per step."""
    root = tmp_path_factory.mktemp("torchrun")
    done = _run(_torchrun("-m", "prefixtune", *_train_args(model_dir, root / "two", str(data_file), steps=3)), root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len([line for line in done.stdout.splitlines() if line.startswith("{")]) == 1  # one summary, process 0
    shutil.copytree(root / "two", root / "after-3-steps")  # what the run wrote, kept apart from the resumed copy
    return root


def test_torchrun_two_processes_equal_one(two_process_run: Path, model_dir: Path, data_file: Path, tmp_path: Path):
    two = two_process_run / "after-3-steps"
    one = tmp_path / "one"
    assert cli.main(_train_args(model_dir, one, str(data_file), steps=3)) == 0
    _assert_same(two, one)
    logged, expected = train.read_metrics(two / "metrics.jsonl"), train.read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in logged] == [r["step"] for r in expected] == [1, 2, 3]  # written once, not twice
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(logged, expected))
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_checkpoint_of_two_processes_resumed_by_one(
    two_process_run: Path, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    two = two_process_run / "two"
    assert cli.main([*_train_args(model_dir, two, str(data_file), steps=6), "--resume"]) == 0
    straight = tmp_path / "straight"
    assert cli.main(_train_args(model_dir, straight, str(data_file), steps=6)) == 0
    _assert_same(two, straight)


def test_accelerate_launch_two_processes_multitask(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"input": w, "target": f"{w} {w}"}) + "\n" for w in ("cat", "dog", "mat")))
    data = (f"names={data_file}", f"echo={other}")
    # A global batch of 2 rows, one per task: each process holds rows of one task only. One epoch of 2 micro-batches
    # a step: echo (3 pairs) trains 1 step, names (6) 3; after step 1 no process uses echo's prefix: it must stay.
    two = tmp_path / "two"
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1"]
    command += ["--main_process_port", str(_free_port()), "-m", "prefixtune"]
    validation = ("--eval-every", "2", "eval_split=all", "eval_size=2", "train_size=6")  # 6 + 2 one-row batches
    done = _run([*command, *_train_args(model_dir, two, *data, steps=None, batch=1), *validation], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = tmp_path / "one"
    assert cli.main([*_train_args(model_dir, one, *data, steps=None, batch=1), *validation]) == 0
    for task in ("names", "echo"):
        _assert_same(two / task, one / task)
    logged, expected = (
        [(r["step"], r["task"], r["val_loss"]) for r in train.read_metrics(run / "metrics.jsonl") if "val_loss" in r]
        for run in (two, one)
    )
    assert [r[:2] for r in logged] == [r[:2] for r in expected]
    assert [r[:2] for r in logged] == [(1, "echo"), (2, "names"), (3, "names")]
    assert all(abs(a[2] - b[2]) < 1e-4 for a, b in zip(logged, expected))


def test_processes_with_different_settings_are_refused(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    # On one machine every process gets the same command line; this stands in for two machines started apart.
    script = tmp_path / "launch.py"
    script.write_text(
        "import os, sys\nfrom prefixtune.cli import main\n"
        "extra = ['lr=0.5'] if os.environ['RANK'] == '1' else []\nsys.exit(main(sys.argv[1:] + extra))\n"
    )
    out = tmp_path / "run"
    done = _run(_torchrun(str(script), *_train_args(model_dir, out, str(data_file), steps=2)), tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("prefixtune: error:")]
    assert len(errors) == 1 and "disagree on the training settings" in errors[0] and "lr: 0.03" in errors[0], errors
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "env, message",
    [({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported"), ({"ACCELERATE_USE_FSDP": "true"}, "FSDP")],
)
def test_engines_that_cannot_run_are_refused_before_training(
    env: dict[str, str], message: str, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    if "ACCELERATE_USE_FSDP" in env and torch.cuda.is_available():
        pytest.skip("FSDP is refused on CPUs only")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "x", "--data", str(data_file), "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_example_fsdp_config_is_what_accelerate_launch_reads(tmp_path: Path) -> None:
    """The example config parses, launches several processes, and asks for the FSDP prefixtune supports."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = Path(__file__).parent.parent / "examples" / "accelerate_fsdp.yaml"
    shutil.copy(config, tmp_path / "c.yaml")
    args = launch_command_parser().parse_args(["--config_file", str(tmp_path / "c.yaml"), "-m", "prefixtune"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp and args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
