"""What a comparison runs: its settings (saved as DIR/compare.json) and the parsing of its flags.

Every function here raises our PrefixTuneError on bad input, before anything is written or trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..config import TrainConfig
from ..errors import PrefixTuneError
from ..methods.registry import METHODS, option_names

DEFAULT_LR_FACTORS = [1 / 3, 1.0, 3.0]

# Fixed by compare itself (flags or the run layout), so not accepted as key=value.
NOT_OVERRIDABLE = {
    "method": "--methods",
    "out": "--out",
    "options": "METHOD.OPTION=VALUE",
    "model": "--model",
    "data": "--data",
    "train_size": "--train-sizes",
    "seed": "--seeds",
    "max_steps": "--max-steps",
    "batch_size": "--batch-size",
}


@dataclass
class CompareSettings:
    """What a comparison runs; saved as DIR/compare.json (with each method's resolved learning rate)."""

    methods: list[str]
    model: str = "smollm2-135m"
    data: str = "e2e"
    max_steps: int = 100
    batch_size: int = 8
    train_sizes: list[int | None] = field(default_factory=lambda: [None])  # None: the whole training split
    seeds: list[int] = field(default_factory=lambda: [0])
    lr: float | None = None  # one rate for every method; None: each method's METHODS[m].default_lr
    eval_split: str = "test"  # or train, validation, all
    eval_limit: int | None = None
    max_new_tokens: int = 64
    num_beams: int = 1
    untuned: bool = False  # also score the model without training (one more row)
    overrides: list[str] = field(default_factory=list)  # key=value, routed by `route_overrides`
    # the learning-rate sweep (sweep.py): each method's centre rate times these factors, or its own list
    sweep: bool = True
    lr_factors: list[float] = field(default_factory=lambda: list(DEFAULT_LR_FACTORS))
    lr_lists: dict[str, list[float]] = field(default_factory=dict)  # --lrs METHOD=R1,R2,...
    sweep_sizes: list[int | None] | None = None  # train sizes swept (None: every size); the others reuse a winner
    # a method whose best rate is the lowest or highest it tried tries one more beyond it, up to this many times
    sweep_extend: int = 1
    select_split: str = "validation"  # the split the rates are scored on
    bootstrap: int = 1000  # resamples of the test inputs for the 95% interval (0: none)
    metric: str | None = None  # generation's quality metric (bleu, rougeL; None: bleu); classification: accuracy
    bootstrap_seed: int = 0
    jobs: int = 1  # runs at a time, each its own process (not saved in compare.json: a resume may choose another)


def route_overrides(
    methods: list[str], overrides: list[str]
) -> tuple[dict[str, str], dict[str, dict[str, str]], dict[str, str]]:
    """key=value items -> (shared training settings, options per method, learning rate per method); all as text."""
    train_fields = {f.name for f in fields(TrainConfig)}
    common: dict[str, str] = {}
    options: dict[str, dict[str, str]] = {m: {} for m in methods}
    rates: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise PrefixTuneError(f"override {item!r} is not of the form key=value")
        method, dot, rest = key.partition(".")
        if dot and method in METHODS:
            if method not in methods:
                owners = [m for m in methods if key in option_names(m)]  # e.g. lora+prefix's own `lora.r`
                hint = f"; for {owners[0]}'s option write {owners[0]}.{key}={value}" if owners else ""
                raise PrefixTuneError(f"{item}: method {method!r} is not in --methods ({','.join(methods)}){hint}")
            if rest == "lr":
                rates[method] = value
            elif rest in option_names(method):
                options[method][rest] = value
            elif rest in train_fields:
                raise PrefixTuneError(
                    f"{item}: training settings are shared by every method (equal budget); give {rest}={value}"
                )
            else:
                raise PrefixTuneError(
                    f"{item}: {rest!r} is not an option of method {method!r}; "
                    f"its options are: {', '.join(option_names(method))}, lr"
                )
        elif key in NOT_OVERRIDABLE:
            raise PrefixTuneError(f"{item}: compare sets {key} itself; use {NOT_OVERRIDABLE[key]}")
        elif key in train_fields:
            common[key] = value
        else:
            missing = [m for m in methods if key not in option_names(m)]
            if len(missing) == len(methods):
                raise PrefixTuneError(
                    f"{item}: {key!r} is neither a training setting nor an option of {', '.join(methods)}; "
                    "give a method its option as METHOD.OPTION=VALUE (e.g. lora.r=8)"
                )
            if missing:
                takers = [m for m in methods if m not in missing]
                raise PrefixTuneError(
                    f"{item}: option {key!r} does not apply to {', '.join(missing)}; give it to one method "
                    f"as {takers[0]}.{key}={value}"
                )
            for m in methods:
                options[m][key] = value
    return common, options, rates


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise PrefixTuneError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid methods: {', '.join(METHODS)}"
        )
    if not names:
        raise PrefixTuneError("--methods is empty; give a comma-separated list, e.g. prefix,lora,full")
    if len(set(names)) != len(names):
        raise PrefixTuneError(f"--methods names a method twice: {text}")
    return names


def parse_sizes(text: str) -> list[int | None]:
    """`50,100,all` -> [50, 100, None]."""
    sizes: list[int | None] = []
    for piece in (p.strip() for p in text.split(",") if p.strip()):
        if piece == "all":
            sizes.append(None)
            continue
        if not piece.isdigit() or int(piece) < 1:
            raise PrefixTuneError(
                f"--train-sizes: {piece!r} is not a positive integer (or 'all'); sizes count examples"
            )
        sizes.append(int(piece))
    if not sizes or len(set(sizes)) != len(sizes):
        raise PrefixTuneError(f"--train-sizes {text!r}: give distinct sizes, e.g. 50,100,200,500")
    return sorted(sizes, key=lambda s: float("inf") if s is None else s)


def parse_seeds(text: str) -> list[int]:
    if not text.strip(" ,"):
        raise PrefixTuneError("--seeds is empty; give comma-separated integers, e.g. 0,1,2")
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise PrefixTuneError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise PrefixTuneError(f"--seeds {text!r}: give distinct integers, e.g. 0,1")
    return seeds


def parse_factors(text: str) -> list[float]:
    """`--lr-sweep 0.333,1,3`: factors applied to each method's centre rate (its default, --lr or METHOD.lr)."""
    factors = _positive_floats(text, "--lr-sweep")
    if len(factors) < 2:
        raise PrefixTuneError(
            f"--lr-sweep {text!r}: a sweep needs at least 2 rates (e.g. 0.333,1,3); for one rate use --no-sweep"
        )
    return factors


def parse_rate_lists(items: list[str], methods: list[str]) -> dict[str, list[float]]:
    """`--lrs prefix=1e-3,3e-3,1e-2` (repeatable): a method's own rates, instead of its centre rate x factors."""
    lists: dict[str, list[float]] = {}
    for item in items:
        method, sep, rates = item.partition("=")
        method = method.strip()
        if not sep or not method:
            raise PrefixTuneError(f"--lrs {item!r}: give METHOD=R1,R2,... (e.g. prefix=1e-3,3e-3,1e-2)")
        if method not in methods:
            raise PrefixTuneError(f"--lrs {item}: method {method!r} is not in --methods ({','.join(methods)})")
        if method in lists:
            raise PrefixTuneError(f"--lrs names method {method!r} twice")
        lists[method] = _positive_floats(rates, f"--lrs {method}")
        if len(lists[method]) < 2:
            raise PrefixTuneError(
                f"--lrs {item}: a sweep needs at least 2 rates; for one rate give {method}.lr=X with --no-sweep"
            )
    return lists


def _positive_floats(text: str, flag: str) -> list[float]:
    values = []
    for piece in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = float(piece)
        except ValueError:
            raise PrefixTuneError(f"{flag}: {piece!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise PrefixTuneError(f"{flag}: {piece!r} must be a positive number")
        values.append(value)
    if len(set(values)) != len(values):
        raise PrefixTuneError(f"{flag} {text!r}: a value is given twice")
    return values
