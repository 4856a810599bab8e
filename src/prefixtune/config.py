"""Run configuration: a dataclass with documented fields, YAML files, `key=value` overrides, validation."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_bytes
from .errors import PrefixTuneError


@dataclass
class TrainConfig:
    """Everything `prefixtune train` needs; the run directory records the resolved copy as config.yaml."""

    model: str = field(default="smollm2-135m", metadata={"help": "built-in alias, HF id, local dir or .gguf file"})
    data: str | dict[str, str] = field(
        default="e2e",
        metadata={
            "help": "built-in set (e2e, xsum, multiemo), .jsonl/.csv or hf:NAME; several tasks: NAME=PATH,... "
            "(one prefix per task, saved in OUT/NAME/; a file whose records carry `task` also trains one per task)"
        },
    )
    out: str = field(default="runs/prefix", metadata={"help": "run directory: adapter, metrics, checkpoints"})
    method: str = field(default="prefix", metadata={"help": "parameter-efficient method to train"})
    task: str = field(
        default="generate",
        metadata={"help": "generate (seq2seq text) or classify (decoders: label words; encoders: a classifier head)"},
    )
    data_dir: str | None = field(default=None, metadata={"help": "where built-in data files are looked up first"})
    source_field: str | None = field(default=None, metadata={"help": "record field holding the input"})
    target_field: str | None = field(default=None, metadata={"help": "record field holding the target"})
    train_split: str = field(default="train", metadata={"help": "split to train on: train, validation, test or all"})
    eval_split: str = field(default="validation", metadata={"help": "split scored during training (all = whole data)"})
    eval_data: str | None = field(
        default=None,
        metadata={"help": "data set whose eval_split is scored during training (default: data; one task only)"},
    )
    train_size: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    eval_size: int | None = field(default=64, metadata={"help": "validation examples scored every eval_every"})
    max_length: int = field(default=256, metadata={"help": "max tokens per example (source+target); longer are cut"})
    chat_template: bool = field(default=False, metadata={"help": "wrap the source in the tokenizer's chat template"})
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "the method's own options (e.g. num_virtual_tokens, init_text, r); see docs/methods.md"},
    )
    # optimization
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides epochs)"})
    epochs: float | None = field(
        default=None,
        metadata={
            "help": "passes over the training data (default: 6, kept between 80 and 160 steps, or one if that is more)"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float | None = field(
        default=None,
        metadata={"help": "peak learning rate (default: the method's; the prefix's follows target tokens per step)"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "linear warmup steps (default: a tenth of the run's steps, at most 20)"}
    )
    schedule: str = field(default="linear", metadata={"help": "decay after warmup: linear, cosine or constant"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "a step whose loss or gradient is NaN/inf: stop (error naming the step; the last checkpoint "
            "is kept) or skip (no update; counted as skipped_steps in metrics.jsonl)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for init, data order and dropout"})
    deterministic: bool = field(
        default=False,
        metadata={
            "help": "torch's deterministic algorithms (and cuBLAS's fixed workspace): a GPU run and its resume "
            "repeat bit for bit; slower on a GPU, no change on a CPU"
        },
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast on CPU (float32 weights)"})
    device: str | None = field(
        default=None,
        metadata={"help": "cpu, cuda, cuda:N, mps or auto (device_map='auto'); default: cuda if available, else cpu"},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "base weights: float32 or bfloat16 (default: bfloat16 on a GPU that has it, else float32); "
            "trainable weights stay float32"
        },
    )
    target_only_logits: bool = field(
        default=True, metadata={"help": "run the LM head only where the loss is taken (same loss, less work)"}
    )
    bucket_by_length: bool = field(
        default=True, metadata={"help": "batch examples of similar length together (less padding, same losses)"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute layer activations in the backward pass: less memory, ~1/3 more compute"},
    )
    prefix_once_per_step: bool = field(
        default=True, metadata={"help": "with grad_accum > 1, run the prefix MLP once per step, not per micro-batch"}
    )
    # bookkeeping
    log_every: int = field(default=10, metadata={"help": "steps between metrics.jsonl lines"})
    eval_every: int | None = field(default=None, metadata={"help": "steps between validation runs"})
    early_stop: int | None = field(default=None, metadata={"help": "stop after N validations without improvement"})
    save_every: int | None = field(default=None, metadata={"help": "steps between checkpoints"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str, allow_none: bool = True) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if value is None or value <= 0:
                raise PrefixTuneError(f"{name} must be > 0, got {value!r}")

        for name in ("batch_size", "grad_accum", "max_length", "log_every"):
            positive(name, allow_none=False)
        for name in ("max_steps", "epochs", "eval_every", "save_every", "early_stop", "train_size", "eval_size", "lr"):
            positive(name)
        self.data = parse_data(self.data)
        if not isinstance(self.options, dict):
            raise PrefixTuneError("options must be a mapping of method option: value")
        if self.task not in ("generate", "classify"):
            raise PrefixTuneError(f"task must be 'generate' or 'classify', got {self.task!r}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise PrefixTuneError(f"schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise PrefixTuneError(f"on_nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        if (self.warmup_steps or 0) < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise PrefixTuneError("warmup_steps, weight_decay and max_grad_norm must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_data(raw: Any) -> str | dict[str, str]:
    """`data` as one data set (a string) or tasks (task name -> data set).

    Accepts a string, a mapping (YAML), or a list of CLI values: `PATH` alone, or `NAME=PATH` items (repeated
    `--data` flags, or comma-separated in one `data=a=x.jsonl,b=y.jsonl` override). A string that names an
    existing file is always a path, even with '=' in it, and so is an `hf:` spec (its options hold '=': hf:json?
    data_files=x.jsonl). Task names are checked when the data is read.
    """
    if isinstance(raw, dict):
        tasks = {str(k): v for k, v in raw.items()}
        if not tasks:
            raise PrefixTuneError("data: the mapping of task name -> data set is empty")
        for name, spec in tasks.items():
            if not isinstance(spec, str) or not spec:
                raise PrefixTuneError(f"data: task {name!r} needs a data set (a path or a built-in name), got {spec!r}")
        return tasks
    if isinstance(raw, str):
        if "=" in raw and not _exists(raw) and not raw.startswith("hf:"):
            items = raw.split(",") if all("=" in piece for piece in raw.split(",")) else [raw]
        else:
            items = [raw]
    elif isinstance(raw, (list, tuple)) and raw and all(isinstance(item, str) for item in raw):
        items = list(raw)
    else:
        raise PrefixTuneError(f"data must be a data set or a mapping of task name -> data set, got {raw!r}")
    pairs = [item.partition("=") if not (_exists(item) or item.startswith("hf:")) else ("", "", item) for item in items]
    if len(items) == 1 and not pairs[0][1]:
        return items[0]
    tasks: dict[str, str] = {}
    for item, (name, sep, spec) in zip(items, pairs):
        if not sep or not spec:
            raise PrefixTuneError(f"data: {item!r} is not NAME=PATH; several data sets are tasks and need names")
        if name in tasks:
            raise PrefixTuneError(f"data: task {name!r} is given twice")
        tasks[name] = spec
    return tasks


def _exists(item: str) -> bool:
    try:
        return Path(item).expanduser().exists()
    except (RuntimeError, ValueError, OSError):  # "~unknownuser/...", a NUL byte: not an existing path
        return False


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _coerce(cls: type, name: str, raw: Any) -> Any:
    """Turn a YAML value or an override string into the field's type, or raise our error."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    optional = type(None) in typing.get_args(hint)
    if name == "data":
        return parse_data(raw)
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        if optional:
            return None
        raise PrefixTuneError(f"{name} cannot be empty")
    if isinstance(raw, (dict, list, tuple, set, bytes)):  # str() would silently turn it into its Python repr
        raise PrefixTuneError(f"{name} takes one value, got a {type(raw).__name__} ({_short(raw)})")
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "1", "yes", "on"):
                return True
            if str(raw).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if base is float:
            number = float(raw)
            if not math.isfinite(number):
                raise PrefixTuneError(f"{name} must be a finite number, got {raw!r}")
            return number
        return str(raw)
    except (TypeError, ValueError, OverflowError):
        raise PrefixTuneError(f"{name}: {_short(raw)} is not a valid {base.__name__}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def build_config(
    cls: type, file: str | None, values: dict[str, Any], overrides: list[str], option_names: Any = None
) -> Any:
    """Defaults <- YAML file <- flags given on the command line (`values`) <- `key=value` overrides.

    Keys that are not fields of `cls` but are method options (`option_names(method)` says which) go into the
    config's `options` mapping, parsed as YAML scalars; anything else is an error that lists the valid keys.
    """
    known = {f.name for f in fields(cls)}
    merged: dict[str, Any] = {}
    if file:
        try:
            loaded = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except OSError as e:
            raise PrefixTuneError(f"cannot read config file {file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise PrefixTuneError(f"{file}: cannot read as UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise PrefixTuneError(f"{file}: not valid YAML ({(str(e).splitlines() or ['?'])[0]})") from None
        except (ValueError, TypeError, OverflowError, RecursionError) as e:  # "!!int abc", month 13, deep nesting
            raise PrefixTuneError(f"{file}: not valid YAML ({type(e).__name__}: {str(e)[:200]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise PrefixTuneError(f"{file}: expected a mapping of field: value")
        keys = [k for k in loaded if not isinstance(k, str)]
        if keys:
            raise PrefixTuneError(f"{file}: setting names must be text, got {_short(keys[0])}")
        merged.update({k.replace("-", "_"): v for k, v in loaded.items()})
    merged.update({k: v for k, v in values.items() if v is not None})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PrefixTuneError(f"override {item!r} is not of the form key=value")
        merged[key.strip().replace("-", "_")] = value
    options = merged.pop("options", None)
    if options is None or options == "":
        options = {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise PrefixTuneError(
            f"options must be a mapping of method option: value, got {_short(options)}; "
            "or give each option as its own key (e.g. num_virtual_tokens=10)"
        )
    options = dict(options)
    extra = {k: merged.pop(k) for k in sorted(set(merged) - known)}
    if extra:
        method = merged.get("method", next(f.default for f in fields(cls) if f.name == "method"))
        valid = option_names(str(method)) if option_names else []
        unknown = sorted(set(extra) - set(valid))
        if unknown:
            raise PrefixTuneError(
                f"unknown config keys {unknown}: not a training setting, nor an option of method {method!r} "
                f"({', '.join(valid) or 'none'}); see `prefixtune train --help`"
            )
        options.update({k: _scalar(v) for k, v in extra.items()})
    merged["options"] = options
    return cls(**{k: v if k == "options" else _coerce(cls, k, v) for k, v in merged.items()})


def _scalar(value: Any) -> Any:
    """An override string as a YAML scalar (8 -> int, true -> bool, 1e-3 -> float); other text stays text."""
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        return value
    return parsed if isinstance(parsed, (bool, int, float)) or parsed is None else value


def save_config(config: Any, path: str | Path) -> None:
    atomic_write_bytes(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False).encode())
