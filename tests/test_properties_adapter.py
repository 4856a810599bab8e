"""Property-based tests of the adapter loaders: prefix adapters (ours and PEFT's layout) and the other methods'
saved formats (prompt, bottleneck adapter, LoRA, full fine-tuning).

Each input is a valid saved directory with something broken: random bytes, a truncated or bit-flipped
safetensors file, a safetensors header with other dtypes, shapes or offsets, valid tensors of the wrong dtype or
shape, missing or extra tensors, NaN/inf, or an adapter_config.json with fields deleted, retyped or added. Loading
either works (and the loaded adapter then runs a forward pass with finite logits) or raises PrefixTuneError, and
a refused load leaves the model exactly as it was (same adapters, same logits).
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from prefixtune import PrefixConfig, PrefixTuneError
from prefixtune.methods.registry import build_method, load_trained
from prefixtune.model import PrefixModel
from property_support import Tally, any_of, fuzz, json_values, report
from tiny import tiny

IDS = torch.tensor([[5, 6, 7]])
DELETE = object()
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "X"]


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    yield from report(Tally(), "adapter loader", request)


class Saved(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case: not the model's weights
        return "<saved adapters>"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama wrapped once, its logits, and one valid saved directory per format."""
    root = tmp_path_factory.mktemp("adapter_properties")
    model = tiny("llama-gqa")
    with torch.no_grad():
        base_logits = model(input_ids=IDS).logits
    dirs: dict[str, Path] = {}
    pm = PrefixModel(copy.deepcopy(model))
    pm.add_adapter("ours", PrefixConfig(num_virtual_tokens=3, init="random", projection_dim=8))
    pm.save_adapter(root / "prefix", "ours")
    dirs["prefix"] = root / "prefix"
    dirs["peft-prefix"] = root / "peft-prefix"  # PEFT's own layout: no "prefixtune" block
    shutil.copytree(dirs["prefix"], dirs["peft-prefix"])
    config = json.loads((dirs["peft-prefix"] / "adapter_config.json").read_text())
    del config["prefixtune"]
    (dirs["peft-prefix"] / "adapter_config.json").write_text(json.dumps(config))
    for method, options in [
        ("prompt", {"num_virtual_tokens": 3, "init": "random"}),
        ("adapter", {"bottleneck_dim": 4}),
        ("lora", {"r": 2}),
        ("full", {}),
    ]:
        trained = build_method(method, copy.deepcopy(model), options)
        trained.save_trained(root / method)
        dirs[method] = root / method
    return Saved(model=model, logits=base_logits, wrapped=PrefixModel(model), dirs=dirs, root=root, n=[0])


# ----- how a directory gets broken ------------------------------------------------------------------------------


def _files(directory: Path) -> tuple[Path, Path]:
    """(the JSON config that says what the directory is, the safetensors file with the weights)."""
    for config, weights in [
        ("adapter_config.json", "adapter_model.safetensors"),
        ("bottleneck_adapter.json", "bottleneck_adapter.safetensors"),
        ("config.json", "model.safetensors"),
    ]:
        if (directory / weights).exists():
            return directory / config, directory / weights
    raise AssertionError(f"no weights in {directory}")


def _unpack(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _pack(header: dict[str, Any], data: bytes, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) + pad) + raw + data


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        nxt = tree.get(key)
        if not isinstance(nxt, dict):
            nxt = tree[key] = {}
        tree = nxt
    if value is DELETE:
        tree.pop(path[-1], None)
    else:
        tree[path[-1]] = value


CONFIG_PATHS = [
    ("peft_type",),
    ("num_virtual_tokens",),
    ("num_layers",),
    ("num_attention_heads",),
    ("token_dim",),
    ("num_transformer_submodules",),
    ("modules_to_save",),
    ("base_model_name_or_path",),
    ("task_type",),
    ("prefixtune",),
    ("prefixtune", "format_version"),
    ("prefixtune", "prefix"),
    ("prefixtune", "prefix", "num_virtual_tokens"),
    ("prefixtune", "prefix", "locations"),
    ("prefixtune", "prefix", "head"),
    ("prefixtune", "prefix", "position_convention"),
    ("prefixtune", "prefix", "reparameterize"),
    ("prefixtune", "prefix", "projection_dim"),
    ("prefixtune", "prefix", "dropout"),
    ("prefixtune", "prefix", "init_text"),
    ("prefixtune", "prefix", "unknown_field"),
    ("prefixtune", "base_model"),
    ("prefixtune", "base_model", "embedding_sha256"),
    ("prefixtune", "layers"),
    ("prefixtune", "labels"),
    ("prefixtune", "prompt"),
    ("prefixtune", "prompt", "init"),
    ("prefixtune", "prompt", "num_virtual_tokens"),
    ("adapter",),
    ("adapter", "bottleneck_dim"),
    ("adapter", "style"),
    ("adapter", "activation"),
    ("r",),
    ("lora_alpha",),
    ("target_modules",),
    ("full",),
    ("full", "top_layers"),
    ("hidden_size",),
    ("num_hidden_layers",),
    ("num_key_value_heads",),
    ("vocab_size",),
    ("model_type",),
]
config_values = st.one_of(
    st.just(DELETE),
    st.integers(-2, 12),
    st.integers(min_value=-(2**64), max_value=2**64),
    any_of("PREFIX_TUNING", "PROMPT_TUNING", "LORA", "decoder", ["encoder", "cross"], {"decoder": 2}, "score", "llama"),
    json_values,
)
config_edits = st.lists(st.tuples(any_of(*CONFIG_PATHS), config_values), min_size=1, max_size=3)


def _edit_config(path: Path, edits: list[tuple[tuple[str, ...], Any]]) -> None:
    config = json.loads(path.read_text())
    for where, value in edits:
        _set(config, where, value)
    path.write_text(json.dumps(config))


weight_damage = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4)),
    st.tuples(st.just("header-length"), st.integers(-8, 64)),
    st.tuples(
        st.just("header"),
        st.lists(
            st.tuples(
                any_of("dtype", "shape", "data_offsets", "extra", "metadata", "delete"),
                st.one_of(
                    any_of(*ST_DTYPES),
                    st.lists(st.integers(-1, 40), max_size=3),
                    st.lists(st.integers(min_value=0, max_value=2**40), min_size=2, max_size=2),
                    json_values,
                ),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
)


def _damage_weights(path: Path, damage: tuple[str, Any]) -> None:
    blob = path.read_bytes()
    kind, arg = damage
    if kind == "bytes":
        blob = arg
    elif kind == "truncate":
        blob = blob[: int(arg * len(blob))]
    elif kind == "flip":
        data = bytearray(blob)
        for where, byte in arg:
            data[min(int(where * len(data)), len(data) - 1)] ^= byte or 1
        blob = bytes(data)
    elif kind == "header-length":
        header, data = _unpack(blob)
        blob = _pack(header, data, pad=arg)
    else:
        header, data = _unpack(blob)
        names = sorted(k for k in header if k != "__metadata__") or ["prompt_embeddings"]
        for i, (what, value) in enumerate(arg):
            name = names[i % len(names)]
            if what == "extra":
                header[f"extra.{i}"] = value
            elif what == "metadata":
                header["__metadata__"] = value
            elif what == "delete":
                header.pop(name, None)
            elif isinstance(header.get(name), dict):
                header[name][what] = value
        blob = _pack(header, data)
    path.write_bytes(blob)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], fill: str) -> torch.Tensor:
    t = torch.randn(shape) if fill == "random" else torch.full(shape, float(fill))
    if not dtype.is_floating_point:
        t = t.clamp(-100, 100).nan_to_num(0)
    return t.to(dtype)


tensor_swaps = st.lists(
    st.tuples(
        any_of("same", "other"),  # a tensor of the file, or a new name
        st.one_of(any_of(*DTYPES), st.none()),  # new dtype (None: drop the tensor)
        st.one_of(st.none(), st.lists(st.integers(0, 7), max_size=3).map(tuple)),  # new shape (None: same)
        any_of("random", "nan", "inf", "0"),
    ),
    min_size=1,
    max_size=3,
)


def _swap_tensors(path: Path, swaps: list[tuple[str, Any, Any, str]]) -> None:
    tensors = load_file(path)
    names = sorted(tensors) or ["prompt_embeddings"]
    for i, (which, dtype, shape, fill) in enumerate(swaps):
        name = names[i % len(names)] if which == "same" else f"base_model.score.{i}" if i % 2 else f"prefixtune.x{i}"
        if dtype is None:
            tensors.pop(name, None)
            continue
        old = tensors.get(name)
        size = tuple(old.shape) if shape is None and old is not None else shape or (2,)
        tensors[name] = _tensor(dtype, size, fill)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def _break(saved: dict[str, Any], kind: str, edits: list, damage: Any, swaps: list) -> Path:
    directory = saved["root"] / "work" / kind
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(saved["dirs"][kind], directory)
    config, weights = _files(directory)
    if edits:
        _edit_config(config, edits)
    if swaps:
        _swap_tensors(weights, swaps)
    if damage is not None:
        _damage_weights(weights, damage)
    return directory


# ----- loading ---------------------------------------------------------------------------------------------------


def _load_prefix(tally: Tally, saved: dict[str, Any], name: str, directory: Path, counter: list[int]) -> None:
    pm: PrefixModel = saved["wrapped"]
    before = (list(pm.adapter_names), list(pm.heads.keys()))
    counter[0] += 1
    adapter = f"fuzz{counter[0]}"
    loaded = tally.attempt(name, lambda: pm.add_adapter(adapter, directory))
    if loaded is None:
        assert (list(pm.adapter_names), list(pm.heads.keys())) == before, "a refused adapter must leave no trace"
        with torch.no_grad():
            assert torch.equal(pm(input_ids=IDS, adapter_names=["__base__"]).logits, saved["logits"])
        return
    try:
        with torch.no_grad():
            logits = pm(input_ids=IDS, adapter_names=[adapter]).logits
        assert torch.isfinite(logits).all(), "a loaded adapter must give finite logits"
    finally:
        pm.delete_adapter(adapter)


PREFIX_KINDS = any_of("prefix", "peft-prefix")


@fuzz(80)
@given(kind=PREFIX_KINDS, edits=config_edits)
@example(kind="prefix", edits=[(("prefixtune", "prefix", "projection_dim"), "abc")])
@example(kind="prefix", edits=[(("prefixtune", "prefix", "locations"), 5)])
@example(kind="prefix", edits=[(("num_virtual_tokens",), 0), (("prefixtune", "prefix", "num_virtual_tokens"), 0)])
@example(kind="peft-prefix", edits=[(("num_layers",), 2**40)])
def test_prefix_config_edits(tally: Tally, saved: dict[str, Any], kind: str, edits: list) -> None:
    directory = _break(saved, kind, edits, None, [])
    _load_prefix(tally, saved, "prefix: adapter_config.json edited", directory, saved["n"])


@fuzz(80)
@given(kind=PREFIX_KINDS, damage=weight_damage)
@example(kind="prefix", damage=("truncate", 0.5))
@example(kind="prefix", damage=("header-length", 8))
@example(kind="prefix", damage=("header", [("dtype", "F8_E4M3")]))
@example(kind="prefix", damage=("header", [("shape", [2**40, 2**40])]))
def test_prefix_weights_damaged(tally: Tally, saved: dict[str, Any], kind: str, damage: Any) -> None:
    directory = _break(saved, kind, [], damage, [])
    _load_prefix(tally, saved, "prefix: safetensors bytes damaged", directory, saved["n"])


@fuzz(80)
@given(kind=PREFIX_KINDS, swaps=tensor_swaps, edits=st.one_of(st.just([]), config_edits))
@example(kind="prefix", swaps=[("same", torch.float8_e4m3fn, None, "random")], edits=[])
@example(kind="prefix", swaps=[("same", torch.float16, None, "inf")], edits=[])
@example(kind="prefix", swaps=[("same", torch.int64, None, "0")], edits=[])
@example(kind="prefix", swaps=[("same", None, None, "0")], edits=[])
def test_prefix_tensors_swapped(tally: Tally, saved: dict[str, Any], kind: str, swaps: list, edits: list) -> None:
    directory = _break(saved, kind, edits, None, swaps)
    _load_prefix(tally, saved, "prefix: tensors of other dtypes/shapes", directory, saved["n"])


def test_the_valid_prefix_adapters_load(tally: Tally, saved: dict[str, Any]) -> None:
    """The property tests start from these: they must load (or every refusal above would be vacuous)."""
    for kind in ("prefix", "peft-prefix"):
        pm: PrefixModel = saved["wrapped"]
        pm.add_adapter("valid", saved["dirs"][kind])
        pm.delete_adapter("valid")
        tally.count("valid starting points", "worked")


# ----- the other methods ----------------------------------------------------------------------------------------


def _load_other(tally: Tally, saved: dict[str, Any], method: str, directory: Path) -> None:
    # LoRA and full fine-tuning change or replace the model they load onto: give them a copy
    model = copy.deepcopy(saved["model"]) if method in ("lora", "full") else saved["model"]
    modules = [(name, type(m)) for name, m in model.named_modules()]
    loaded = tally.attempt(f"{method}: broken", lambda: load_trained(model, directory))
    if loaded is None:
        assert [(name, type(m)) for name, m in model.named_modules()] == modules, "a refused load changed the model"
    else:
        try:
            with torch.no_grad():
                logits = loaded(input_ids=IDS).logits
            assert torch.isfinite(logits).all(), f"a loaded {method} must give finite logits"
        finally:
            if hasattr(loaded, "detach") and method == "adapter":
                loaded.detach()
    with torch.no_grad():  # whatever happened, the shared model is as it was
        assert torch.equal(saved["model"](input_ids=IDS).logits, saved["logits"])


@fuzz(70)
@given(
    method=any_of("prompt", "adapter", "lora", "full"),
    edits=st.one_of(st.just([]), config_edits),
    damage=st.one_of(st.none(), weight_damage),
    swaps=st.one_of(st.just([]), tensor_swaps),
)
@example(method="prompt", edits=[(("prefixtune", "prompt", "bogus"), 1)], damage=None, swaps=[])
@example(method="prompt", edits=[(("prefixtune",), {"prompt": {"init": "text"}})], damage=None, swaps=[])
@example(method="adapter", edits=[], damage=None, swaps=[("same", torch.float8_e5m2, None, "random")])
@example(method="lora", edits=[], damage=("truncate", 0.5), swaps=[])
@example(method="full", edits=[], damage=("bytes", b""), swaps=[])
@example(method="full", edits=[(("num_key_value_heads",), 0)], damage=None, swaps=[])
@example(method="lora", edits=[(("r",), 3)], damage=None, swaps=[])
@example(method="lora", edits=[], damage=None, swaps=[("same", None, None, "0")])
@example(method="prompt", edits=[(("peft_type",), [])], damage=None, swaps=[])
@example(method="full", edits=[(("vocab_size",), 10**9)], damage=None, swaps=[])
@example(method="lora", edits=[(("r",), 10**9)], damage=None, swaps=[])
@example(method="adapter", edits=[(("adapter", "bottleneck_dim"), 10**9)], damage=None, swaps=[])
def test_other_methods_saved_formats(
    tally: Tally, saved: dict[str, Any], method: str, edits: list, damage: Any, swaps: list
) -> None:
    directory = _break(saved, method, edits, damage, swaps)
    _load_other(tally, saved, method, directory)


def test_the_valid_saved_methods_load(tally: Tally, saved: dict[str, Any]) -> None:
    for method in ("prompt", "adapter", "lora", "full"):
        model = copy.deepcopy(saved["model"])
        loaded = load_trained(model, saved["dirs"][method])
        with torch.no_grad():
            assert torch.isfinite(loaded(input_ids=IDS).logits).all()
        tally.count("valid starting points", "worked")


def test_a_file_where_the_directory_should_be(saved: dict[str, Any], tmp_path: Path) -> None:
    not_a_dir = tmp_path / "adapter"
    not_a_dir.write_bytes(b"\x00" * 10)
    with pytest.raises(PrefixTuneError):
        saved["wrapped"].add_adapter("nodir", not_a_dir)
    with pytest.raises(PrefixTuneError):
        load_trained(saved["model"], not_a_dir)


@pytest.mark.parametrize(
    "text", ["[" * 100_000 + "]" * 100_000, '{"peft_type": "PREFIX_TUNING", "num_layers": ' + "7" * 5000 + "}"]
)
def test_deep_nesting_and_huge_numbers_in_adapter_config(saved: dict[str, Any], tmp_path: Path, text: str) -> None:
    for method in ("prefix", "prompt", "lora"):
        directory = tmp_path / method
        shutil.copytree(saved["dirs"][method], directory)
        (directory / "adapter_config.json").write_text(text)
        with pytest.raises(PrefixTuneError):
            load_trained(copy.deepcopy(saved["model"]), directory)
    with pytest.raises(PrefixTuneError, match="not valid JSON"):
        saved["wrapped"].add_adapter("deep", tmp_path / "prefix")
