"""The built-in data sets (e2e, xsum, multiemo): found in a data directory, or fetched once from the registry.

They are BIG-bench tasks; the bigbench source distribution on PyPI holds them. It is not installed: its archive is
found through the package index's simple API (package_index.py), streamed, hashed, and only the task files are kept
under `cache_dir()/data/`.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..downloads import cache_dir, cache_lock, pip_download, say
from ..errors import PrefixTuneError
from .package_index import SIMPLE_ACCEPT, NotOnIndex, index_request, listed_files, pip_index_url, redact

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
    alias = data_alias(name)
    for place in _data_locations(data_dir):
        if (place / alias.filename).is_file():
            return place / alias.filename
    return None


def prepare_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local file of a built-in data set, fetching all built-in sets into the cache if it is not found."""
    found = find_dataset(name, data_dir)
    if found is not None:
        return found
    alias = data_alias(name)
    target = data_cache_dir() / alias.filename
    with cache_lock(data_cache_dir(), "bigbench"):
        if not target.is_file():  # another process may have fetched it while we waited
            _fetch_bigbench()
    return target


def data_alias(name: str) -> DataAlias:
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

        request = index_request(bigbench_archive_url(), None)
        with urllib.request.urlopen(request, timeout=60) as response:
            found = extract_tasks(response, BIGBENCH_SIZE)
    except (OSError, EOFError, NotOnIndex) as direct_error:  # index unreachable or odd: pip knows more ways
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
                found = extract_tasks(stream, archive.stat().st_size)
    try:
        for alias in DATA_ALIASES.values():
            atomic_write_bytes(destination / alias.filename, found[alias.member])
    except OSError as e:
        raise PrefixTuneError(f"cannot write the built-in data sets into {destination}: {e}") from None
    say(f"saved {', '.join(DATA_ALIASES)} to {destination}")



def list_datasets(data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The built-in data sets for `prefixtune data`: name, description, whether local, and the file path."""
    rows = []
    for alias in DATA_ALIASES.values():
        found = find_dataset(alias.name, data_dir)
        path = found if found is not None else data_cache_dir() / alias.filename
        cached = found is not None
        rows.append({"name": alias.name, "description": alias.description, "cached": cached, "path": str(path)})
    return rows


def bigbench_archive_url() -> str:
    """Where the pinned bigbench sdist lives, read from the project's page on pip's index (PEP 691 JSON or HTML)."""
    import urllib.request
    from urllib.parse import urldefrag, urljoin

    index = pip_index_url()
    page_url = index.rstrip("/") + f"/{BIGBENCH_PROJECT}/"
    with urllib.request.urlopen(index_request(page_url, SIMPLE_ACCEPT), timeout=60) as response:
        body = response.read()
        content_type = response.headers.get_content_type() if response.headers else ""
        final_url = response.geturl() or page_url  # after redirects: relative links resolve against this
    for name, url, digest in listed_files(body, content_type):
        if name == BIGBENCH_FILENAME:
            if digest and digest.lower() != BIGBENCH_SHA256:
                raise PrefixTuneError(
                    f"the index {redact(index)} lists {BIGBENCH_FILENAME} with sha256 {digest}, "
                    f"not the pinned {BIGBENCH_SHA256}"
                )
            base = page_url if final_url == redact(page_url) else final_url  # keeps credentials for relative links
            return urldefrag(urljoin(base, url))[0]
    raise NotOnIndex(f"the index {redact(index)} lists no {BIGBENCH_FILENAME} for {BIGBENCH_PROJECT}")


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


def extract_tasks(stream: Any, size: int) -> dict[str, bytes]:
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

