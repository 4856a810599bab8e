"""Where a model runs and in which dtype: `--device` and `--dtype` for every command, checked before anything runs.

    placement = resolve_placement("cuda:1", "bfloat16")   # Placement(device=cuda:1, dtype=bfloat16, device_map=None)
    placement = resolve_placement(None, None)              # cuda (bfloat16 where supported) if a GPU is visible,
                                                           # else cpu in float32
    placement = resolve_placement("auto", None)            # device_map="auto": layers spread over the visible GPUs

Defaults: the first CUDA GPU when torch sees one, else the CPU. The dtype defaults to bfloat16 on a GPU that has
it (`torch.cuda.is_bf16_supported()`) and to float32 elsewhere: on a CPU without native bfloat16 (AVX512_BF16 or
AMX) torch emulates bfloat16 matmuls about 100x slower than float32 (docs/performance.md has the measurement), and
where the CPU has it the gain is not measured here, so float32 stays the CPU default; `--dtype bfloat16` on such a
CPU is allowed with a one-line note. Every request the hardware cannot honour (`--device cuda` without a GPU, an
index past the last GPU, `--dtype float16` on a CPU, bfloat16 on a GPU without it, an unknown name) is a
PrefixTuneError, raised before a file is written or a model is loaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from functools import cache

import torch

from .errors import PrefixTuneError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_HELP = (
    "cpu, cuda, cuda:N, mps or auto (device_map='auto': layers over every visible GPU); "
    "default: cuda if available, else cpu"
)
DTYPE_HELP = "base model weights: float32, bfloat16 or float16 (default: bfloat16 on a GPU that has it, else float32)"
_DEVICE = re.compile(r"^(cpu|mps|auto|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Placement:
    """A checked device and dtype. `device_map="auto"` (with `device` None) spreads the layers over the GPUs."""

    device: torch.device | None
    dtype: torch.dtype
    device_map: str | None = None

    @property
    def kind(self) -> str:
        """The device type ("cpu", "cuda", "mps"); for device_map="auto" where the first layers go."""
        if self.device is not None:
            return self.device.type
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`, the same for every subcommand (serve, train, eval, generate, compare, demo)."""
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help=DTYPE_HELP)


def resolve_device(spec: str | torch.device | None) -> torch.device | None:
    """The device a name asks for, checked against this machine (None: device_map="auto")."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or spec == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = spec.strip().lower()
    if not _DEVICE.match(name):
        raise PrefixTuneError(f"unknown device {spec!r}: use cpu, cuda, cuda:N, mps or auto")
    if name == "auto":
        return None
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
            raise PrefixTuneError(
                f"--device {spec}: torch sees no CUDA GPU (torch {torch.__version__} built {built}); "
                "use --device cpu, or run where a GPU is visible"
            )
        index = int(name.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise PrefixTuneError(f"--device {spec}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PrefixTuneError(f"--device {spec}: the Apple MPS backend is not available here; use --device cpu")
    return torch.device(name)


def resolve_dtype(spec: str | torch.dtype | None, kind: str) -> torch.dtype:
    """The weights' dtype for a device type ("cpu", "cuda", "mps"): the request checked, or the default."""
    if isinstance(spec, torch.dtype):
        spec = str(spec).removeprefix("torch.")
    if spec is None or spec == "":
        return torch.bfloat16 if kind == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if spec not in DTYPES:
        raise PrefixTuneError(f"unknown dtype {spec!r}: use {', '.join(DTYPES)}")
    dtype = DTYPES[spec]
    if kind == "cpu" and dtype == torch.float16:
        raise PrefixTuneError(
            "--dtype float16 on the CPU: torch has no fast float16 kernels there; use float32 (or bfloat16)"
        )
    if kind == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise PrefixTuneError(
            f"--dtype bfloat16: {torch.cuda.get_device_name()} has no bfloat16 support; use float16 or float32"
        )
    if kind == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        print(
            "prefixtune: note: this CPU has no native bfloat16 (no AVX512_BF16 or AMX): torch emulates it, "
            "about 100x slower than float32 (docs/performance.md)",
            file=sys.stderr,
        )
    return dtype


def resolve_placement(device: str | torch.device | None, dtype: str | torch.dtype | None) -> Placement:
    """`--device` and `--dtype` checked together (raises PrefixTuneError for what this machine cannot do)."""
    resolved = resolve_device(device)
    if resolved is None:  # device_map="auto": the dtype is the one of the GPUs (or the CPU) it spreads over
        kind = "cuda" if torch.cuda.is_available() else "cpu"
        return Placement(None, resolve_dtype(dtype, kind), "auto")
    return Placement(resolved, resolve_dtype(dtype, resolved.type))


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (the avx512_bf16 or amx_bf16 flags of /proc/cpuinfo, as
    `lscpu` shows them); elsewhere oneDNN's own check."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its input embeddings' device (the first layers' under device_map="auto")."""
    for candidate in (model, getattr(model, "base_model", None)):  # wrappers (PrefixModel) hold the model inside
        get = getattr(candidate, "get_input_embeddings", None)
        weight = getattr(get(), "weight", None) if callable(get) else None
        if isinstance(weight, torch.Tensor):
            return weight.device
    return next(model.parameters()).device
