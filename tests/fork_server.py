"""A fork server for the SIGKILL trials (test_crash_safety.py): run as a script, never imported by tests.

Starting a process that imports torch and transformers takes 10-20 s on a busy machine, far more than a tiny
training run. This process pays that once: it imports what `prefixtune train` uses (and loads the model once, so
transformers' lazy modules are loaded too), then forks one child per command. Each child runs
`prefixtune.cli.main(argv)`, the function the `prefixtune` console script calls, and exits with its return code;
the test kills children with SIGKILL. The parent never runs a backward pass, so no autograd or OpenMP threads
exist at fork time (OMP_NUM_THREADS=1 in the environment keeps the children single-threaded and bitwise
reproducible).

Protocol, one JSON object per line. In (stdin): {"id": N, "argv": [...], "log": PATH}. Out (stdout):
{"ready": true} once, {"id": N, "pid": PID} when child N is started, {"exited": PID, "code": C} when a child
ends (C < 0: killed by signal -C).
"""

from __future__ import annotations

import io
import json
import os
import select
import sys
import traceback


def _warm(model_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import yaml  # noqa: F401

    from prefixtune import cli, data, eval, train  # noqa: F401
    from prefixtune.methods import registry  # noqa: F401
    from prefixtune.models import load_model
    from prefixtune.train import checkpoint  # noqa: F401

    cli.build_parser()
    load_model(model_dir)  # imports the model's and the tokenizer's modules; no autograd, no threads
    fig, ax = plt.subplots()  # loads the fonts that loss.png needs
    ax.plot([0, 1], [0, 1], label="x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


def _emit(record: dict) -> None:
    os.write(1, (json.dumps(record) + "\n").encode())


def _child(argv: list[str], log: str) -> None:
    code = 99
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(0)
        from prefixtune import cli

        code = cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    _warm(sys.argv[1])
    _emit({"ready": True})
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.01)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                command = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(command["argv"], command["log"])
                _emit({"id": command["id"], "pid": pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _emit({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
