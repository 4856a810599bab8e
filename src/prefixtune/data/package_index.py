"""A minimal client of the package index's simple API (PEP 691 JSON or PEP 503 HTML): where pip would fetch a file.

Used to stream the bigbench source archive for the built-in data without installing it.
"""

from __future__ import annotations

import ast
import contextlib
import html.parser
import json
import os
import subprocess
import sys
from typing import Any

from ..errors import PrefixTuneError, first_line


class NotOnIndex(PrefixTuneError):
    """The configured index could not name the archive (no listing, an unreadable one, or the file not in it)."""


SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
SIMPLE_ACCEPT = f"{SIMPLE_JSON}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"


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
        raise NotOnIndex("pip is not importable, so its default index is unknown") from None
    return str(PyPI.simple_url)


def redact(url: str) -> str:
    """A URL fit for messages: any user:password@ dropped."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def index_request(url: str, accept: str | None) -> Any:
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
        url = redact(url)
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


def listed_files(body: bytes, content_type: str) -> list[tuple[str, str, str | None]]:
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
            raise NotOnIndex(f"the index's JSON listing is unreadable ({first_line(e)})") from None
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
