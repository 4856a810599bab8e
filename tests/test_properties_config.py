"""Property-based tests of the config loader: `build_config` (YAML file <- flags <- key=value overrides), then the
method's own config from the options (`make_config`), as `prefixtune train` does.

Random bytes and text as the YAML file, YAML documents with random keys (field names, method options, anything,
non-string keys) and values (JSON values, YAML tags, dates, anchors, infinities), and random overrides: either a
config comes back whose every field has its declared type and a sane value, or PrefixTuneError. A config that
was built saves to config.yaml and reads back equal.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from prefixtune import PrefixTuneError
from prefixtune.config import TrainConfig, build_config, save_config
from prefixtune.methods.registry import METHODS, make_config, option_names
from property_support import Tally, any_of, fuzz, json_values, report, texts

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
OPTIONS = sorted({name for method in METHODS for name in option_names(method)})
KEYS = (*FIELDS, *OPTIONS, "options")
# YAML values a JSON generator never makes: tags, timestamps, anchors and aliases, special floats, sets, binary
YAML_VALUES = (
    "~",
    "null",
    "''",
    ".inf",
    "-.inf",
    ".nan",
    "0x1F",
    "0o17",
    "1_000",
    "1e-3",
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "!!int abc",
    "!!float x",
    "!!timestamp 2001-13-45",
    "!!binary ===",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!python/object:os.system ls",
    "&a [*a]",
    "*nope",
    "[1, [2, [3]]]",
    "{a: 1, b: {c: 2}}",
    "yes",
    "off",
    "'e2e'",
    "tiny=a.jsonl,other=b.jsonl",
    "- 1\n  - 2",
    "9" * 5000,
)


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    yield from report(Tally(), "config loader", request)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config_properties")


def _check_types(cfg: TrainConfig) -> None:
    """Every field holds what its annotation says, with sane numbers."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = tuple(typing.get_origin(a) or a for a in (typing.get_args(hint) if union else (hint,)))
        if value is None:
            assert type(None) in allowed, f.name
            continue
        if isinstance(value, bool):
            assert bool in allowed, (f.name, value)
        elif isinstance(value, float):
            assert float in allowed and math.isfinite(value), (f.name, value)
        else:
            assert isinstance(value, allowed), (f.name, value)
    assert all(isinstance(k, str) for k in cfg.options)
    if isinstance(cfg.data, dict):
        assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in cfg.data.items())


def _build(tally: Tally, name: str, work: Path, file: str | None, overrides: list[str]) -> TrainConfig | None:
    cfg = tally.attempt(name, lambda: build_config(TrainConfig, file, {}, overrides, option_names))
    if cfg is None:
        return None
    _check_types(cfg)
    tally.attempt("method config", lambda: make_config(cfg.method, cfg.options))
    # what train writes as config.yaml reads back as the same config
    saved = work / "saved.yaml"
    save_config(cfg, saved)
    assert build_config(TrainConfig, str(saved), {}, [], option_names) == cfg
    return cfg


# Values of the right type for each key (so that many configs are built), else anything.
HINTS = typing.get_type_hints(TrainConfig)
OPTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "num_virtual_tokens": st.integers(0, 30),
    "projection_dim": st.integers(1, 64),
    "reparameterize": st.booleans(),
    "init": any_of("random", "vocab", "text"),
    "init_text": st.text(min_size=1, max_size=10),
    "position_convention": any_of("peft", "zero"),
    "dropout": st.floats(0, 0.99),
    "locations": any_of("decoder", "encoder,cross", ["decoder"], ["encoder", "cross"]),
    "head": any_of(None, "auto", "score"),
    "r": st.integers(1, 16),
    "alpha": st.integers(1, 64),
    "target_modules": any_of("all-linear", "q_proj,v_proj", ["c_attn"]),
    "style": any_of("houlsby", "pfeiffer"),
    "bottleneck_dim": st.integers(1, 64),
    "activation": any_of("relu", "gelu", "silu", "tanh"),
    "top_layers": st.integers(1, 4),
    "train_head": st.booleans(),
}


def typed(key: str) -> st.SearchStrategy[Any]:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in OPTION_VALUES:
        return OPTION_VALUES[leaf]
    special = {
        "data": any_of("e2e", "xsum", "a.jsonl", "a=x.jsonl,b=y.jsonl", {"a": "x.jsonl"}, ["a=x.jsonl", "b=y.jsonl"]),
        "method": any_of(*METHODS),
        "task": any_of("generate", "classify"),
        "schedule": any_of("linear", "cosine", "constant"),
        "train_split": any_of("train", "validation", "test", "all"),
        "on_nonfinite": any_of("stop", "skip"),
    }
    if key in special:
        return special[key]
    hint = HINTS.get(key)
    kinds = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    if kinds and kinds[0] is bool:
        return st.booleans()
    if kinds and kinds[0] is int:
        return st.integers(0, 1000)
    if kinds and kinds[0] is float:
        return st.floats(0, 10)
    return st.text(alphabet="abc/._-", min_size=1, max_size=8)


def key_values(keys: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, Any]]:
    return keys.flatmap(lambda k: st.tuples(st.just(k), st.one_of(typed(k), typed(k), json_values)))


yaml_keys = st.one_of(any_of(*KEYS), any_of(*KEYS), texts, st.integers(), st.none(), st.booleans(), st.floats())
yaml_documents = st.one_of(
    st.lists(key_values(any_of(*KEYS)), max_size=6).map(dict),
    st.lists(key_values(any_of(*FIELDS)), max_size=6).map(dict),
    st.dictionaries(yaml_keys, json_values, max_size=5),
    json_values,
)


def _dump(document: Any) -> bytes:
    # allow_unicode=False: yaml escapes what it cannot write as UTF-8 (lone surrogates) instead of failing
    return yaml.safe_dump(document, allow_unicode=False).encode()


def _raw_yaml(pairs: list[tuple[str, str]]) -> bytes:
    return "".join(f"{key}: {value}\n" for key, value in pairs).encode("utf-8", "surrogatepass")


def _as_override(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    return f"{key}={value}"


override_values = st.one_of(texts, any_of(*YAML_VALUES), st.integers().map(str), st.floats().map(str))
typed_overrides = key_values(any_of(*KEYS)).map(lambda kv: _as_override(*kv))
overrides = st.lists(
    st.one_of(
        typed_overrides,
        typed_overrides,
        st.builds(lambda k, v: f"{k}={v}", st.one_of(any_of(*KEYS), texts), override_values),
        texts,
    ),
    max_size=4,
)


@fuzz(100)
@given(
    content=st.one_of(
        st.binary(max_size=100),
        st.builds(lambda t: t.encode(), texts),
        st.builds(_dump, yaml_documents),
        st.builds(_dump, yaml_documents),
        st.builds(_raw_yaml, st.lists(st.tuples(st.one_of(any_of(*KEYS), texts), any_of(*YAML_VALUES)), max_size=4)),
        st.builds(lambda b, rest: b"\xef\xbb\xbf" * b + rest.replace(b"\n", b"\r\n"), st.booleans(), st.binary()),
    ),
    overrides=st.one_of(st.just([]), overrides),
)
@example(content=b"\xff\xfe\x00", overrides=[])
@example(content=b"1: 2\n", overrides=[])
@example(content=b"options: [1, 2]\n", overrides=[])
@example(content=b"seed: !!int abc\n", overrides=[])
@example(content=b"model: !!timestamp 2001-13-45\n", overrides=[])
@example(content=b"lr: .nan\n", overrides=[])
@example(content=b"model: {a: 1}\n", overrides=[])
@example(content=b"a: " + b"[" * 600 + b"]" * 600 + b"\n", overrides=[])
@example(content=b"", overrides=["options=abc"])
@example(content=b"", overrides=["r=" + "[" * 600 + "]" * 600])
@example(content=b"", overrides=["epochs=inf"])
@example(content=b"", overrides=["data=~nosuchuser=x"])
def test_yaml_file_and_overrides(tally: Tally, work: Path, content: bytes, overrides: list[str]) -> None:
    path = work / "config.yaml"
    path.write_bytes(content)
    _build(tally, "YAML file + overrides", work, str(path), overrides)


@fuzz(100)
@given(
    overrides=st.lists(
        st.one_of(typed_overrides, typed_overrides, st.builds(lambda k, v: f"{k}={v}", any_of(*KEYS), override_values)),
        min_size=1,
        max_size=5,
    ),
    method=st.one_of(st.none(), any_of(*METHODS)),
)
@example(overrides=["num_virtual_tokens=abc"], method="prefix")
@example(overrides=["projection_dim=abc"], method="prefix")
@example(overrides=["dropout=abc"], method="prefix")
@example(overrides=["locations=[1]"], method="prefix")
@example(overrides=["alpha=abc"], method="lora")
@example(overrides=["activation=[relu]"], method="adapter")
def test_overrides_and_method_options(tally: Tally, work: Path, overrides: list[str], method: str | None) -> None:
    if method is not None:
        overrides = [f"method={method}", *overrides]
    _build(tally, "overrides", work, None, overrides)


@fuzz(60)
@given(field=any_of(*[f for f in FIELDS if f not in ("data", "options")]), value=any_of("[1, 2]", "{a: 1}", "[]", "{}"))
def test_lists_and_mappings_are_not_scalars(tally: Tally, work: Path, field: str, value: str) -> None:
    """A list or mapping where a setting wants one value is refused, never turned into its Python repr."""
    path = work / "config.yaml"
    path.write_text(f"{field}: {value}\n")
    with pytest.raises(PrefixTuneError, match=field):
        build_config(TrainConfig, str(path), {}, [], option_names)
    tally.count("list/mapping for a scalar", "refused")


def test_missing_or_unreadable_file_is_our_error(tmp_path: Path) -> None:
    with pytest.raises(PrefixTuneError, match="cannot read"):
        build_config(TrainConfig, str(tmp_path / "nope.yaml"), {}, [], option_names)
    with pytest.raises(PrefixTuneError, match="cannot read"):
        build_config(TrainConfig, str(tmp_path), {}, [], option_names)
