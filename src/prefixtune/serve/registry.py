"""Which adapters the server answers for, and loading/unloading them at run time.

Every adapter is validated (`peft_format.read_prefix`) and checked against the base model (`add_adapter`: layers,
KV heads, head dim, fingerprint) before it is served. The model itself only changes on the model thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import data, peft_format
from ..errors import PrefixTuneError
from ..model import BASE, PrefixModel, check_adapter_name
from .protocol import APIError
from .scheduler import Scheduler

log = logging.getLogger("prefixtune.serve")


@dataclass
class AdapterInfo:
    name: str
    path: str | None
    created: int
    num_virtual_tokens: int
    position_offset: int  # added to the real tokens' positions (PEFT convention: P)
    prompt_format: dict[str, Any] | None = None  # as saved (prefixtune.prompt_format); None: not recorded


class AdapterRegistry:
    def __init__(
        self,
        model: PrefixModel,
        scheduler: Scheduler,
        base_name: str,
        adapters_dir: str | os.PathLike[str] | None = None,
        *,
        max_model_len: int | None = None,
        force: bool = False,
    ) -> None:
        self.model = model
        self.scheduler = scheduler
        self.base_name = base_name
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir is not None else None
        self.force = force
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        self.served: dict[str, AdapterInfo] = {}
        self.rejected: dict[str, str] = {}  # directory name -> why it was not loaded at start-up
        for name in model.adapter_names:  # adapters attached before the server was made
            self.served[name] = self._info(name, None)

    # ----- lookups ------------------------------------------------------------------------------------------

    def resolve(self, model_name: str) -> str:
        """The `model` field of a request -> an adapter name, or BASE for the base model."""
        if model_name in (self.base_name, BASE):
            return BASE
        if model_name in self.served:
            return model_name
        raise APIError(
            404,
            f"the model {model_name!r} does not exist; GET /v1/models lists {[self.base_name, *self.served]}",
            type="not_found_error",
            param="model",
        )

    def context_limit(self, adapter: str) -> int:
        """Most real tokens (prompt + completion) a request on `adapter` may hold."""
        offset = self.served[adapter].position_offset if adapter != BASE else 0
        return self.max_model_len - offset

    def models(self) -> list[dict[str, Any]]:
        base = {"id": self.base_name, "object": "model", "created": int(time.time()), "owned_by": "prefixtune"}
        base |= {"root": self.base_name, "parent": None, "max_model_len": self.max_model_len, "prompt_format": None}
        listed = [base]
        for info in self.served.values():
            listed.append(
                {
                    "id": info.name,
                    "object": "model",
                    "created": info.created,
                    "owned_by": "prefixtune",
                    "root": info.path or info.name,
                    "parent": self.base_name,
                    "max_model_len": self.max_model_len - info.position_offset,
                    "num_virtual_tokens": info.num_virtual_tokens,
                    "prompt_format": info.prompt_format,
                }
            )
        return listed

    # ----- start-up -----------------------------------------------------------------------------------------

    def load_directory(self) -> None:
        """Load every adapter directory under adapters_dir (before the model thread starts)."""
        if self.adapters_dir is None:
            return
        if not self.adapters_dir.is_dir():
            raise PrefixTuneError(f"--adapters {self.adapters_dir} is not a directory")
        for path in sorted(p for p in self.adapters_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                self._check_new_name(path.name)
                _saved_format(path)  # a prompt format this version cannot apply: not served
                self.model.add_adapter(path.name, path, force=self.force)
            except (PrefixTuneError, APIError) as exc:
                self.rejected[path.name] = str(exc)
                log.warning("adapter %s not loaded: %s", path.name, exc)
                continue
            self.served[path.name] = self._info(path.name, str(path))
            log.info("adapter %s loaded from %s", path.name, path)

    # ----- run time -----------------------------------------------------------------------------------------

    async def load(self, name: str, path: str | None) -> AdapterInfo:
        self._check_new_name(name)
        if name in self.model.adapters:
            raise APIError(
                409, f"adapter {name!r} is still being unloaded (requests using it are running); retry shortly"
            )
        where = self._adapter_path(name, path)
        try:
            await asyncio.to_thread(peft_format.read_prefix, where)  # the files are whole and well-formed
            await asyncio.to_thread(_saved_format, where)
            await asyncio.wrap_future(
                self.scheduler.call(lambda: self.model.add_adapter(name, where, force=self.force))
            )
        except PrefixTuneError as exc:
            status = 409 if "already exists" in str(exc) else 400
            raise APIError(status, str(exc), param="path") from None
        self.served[name] = info = self._info(name, str(where))
        log.info("adapter %s loaded from %s", name, where)
        return info

    def unload(self, name: str) -> None:
        """Stop serving `name` now; the model drops it once the requests already using it have finished."""
        if name not in self.served:
            raise APIError(404, f"no adapter named {name!r} is loaded", type="not_found_error", param="name")
        del self.served[name]
        self.scheduler.retire(name)

    # ----- helpers ------------------------------------------------------------------------------------------

    def _check_new_name(self, name: str) -> None:
        try:
            check_adapter_name(name)
        except PrefixTuneError as exc:
            raise APIError(400, str(exc), param="name") from None
        if name == self.base_name or name in self.served:
            raise APIError(409, f"the name {name!r} is already served; unload it first", param="name")

    def _adapter_path(self, name: str, path: str | None) -> Path:
        """ADAPTERS_DIR/name by default; a given path must stay inside ADAPTERS_DIR when one is set."""
        if self.adapters_dir is None:
            if path is None:
                raise APIError(400, "give the adapter's path: this server has no --adapters directory", param="path")
            return Path(path).resolve()
        where = (self.adapters_dir / (path if path is not None else name)).resolve()
        if where != self.adapters_dir and self.adapters_dir not in where.parents:
            raise APIError(400, f"adapter paths must be inside {self.adapters_dir}", param="path")
        return where

    def prompt_format(self, adapter: str) -> data.PromptFormat | None:
        """The format `adapter` was trained with (None for the base model and adapters that do not record one)."""
        info = self.served.get(adapter)
        if info is None or info.prompt_format is None:
            return None
        return data.PromptFormat.from_saved(info.prompt_format, info.path or adapter)

    def _info(self, name: str, path: str | None) -> AdapterInfo:
        config = self.model.adapter_config(name)
        p = config.num_virtual_tokens
        offset = p if config.position_convention == "peft" else 0
        return AdapterInfo(name, path, int(time.time()), p, offset, _saved_format(path) if path else None)


def _saved_format(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The adapter's prefixtune.prompt_format as a dict, checked: one this version cannot apply is refused."""
    saved = peft_format.read_prompt_format(path)
    if saved is None:
        return None
    data.PromptFormat.from_saved(saved, str(path))
    return saved if isinstance(saved, dict) else {"type": saved}
