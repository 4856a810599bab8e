"""The HTTP side's tokenizer: its own copy, so that no handler ever waits on the model thread.

The model thread detokenizes every token of every row (`TextStream`); a Hugging Face fast tokenizer is one Rust
object whose encode borrows it mutably, so two threads using it at once can fail ("Already borrowed"). Rather
than a lock the model thread holds per token (which an `async` handler waiting on it would hold the whole event
loop behind), the HTTP side tokenizes with a copy of its own, on the event loop: nothing is shared. A tokenizer
that cannot be copied is shared under the model thread's lock instead (logged; handlers then wait for it again).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

from .. import data

log = logging.getLogger("prefixtune.serve")
_BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}  # GPT-2 byte-level alphabet -> byte


class HttpTokenizer:
    """Encode, decode and token texts for the handlers, on the event loop's thread."""

    def __init__(self, tokenizer: Any, model_thread_lock: threading.Lock) -> None:
        self._guard: AbstractContextManager[Any] = nullcontext()
        try:
            self.tokenizer = copy.deepcopy(tokenizer)
        except Exception as exc:  # noqa: BLE001 - whatever the tokenizer's own pickling raises
            log.warning("the tokenizer cannot be copied (%s): the HTTP side shares it behind the model's lock", exc)
            self.tokenizer, self._guard = tokenizer, model_thread_lock
        self.shared = self.tokenizer is tokenizer
        self._texts: dict[int, str] = {}
        self._byte_level = _is_byte_level(self.tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._guard:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._guard:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token: int) -> str:
        """One token's text, as vLLM names tokens in logprobs (half a character decodes to U+FFFD)."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.decode([token])
        return text

    def token_bytes(self, token: int) -> list[int]:
        """One token's UTF-8 bytes (OpenAI's chat `bytes`): the exact bytes for byte-level BPE tokenizers, so that
        the bytes of tokens that split a character join into it; otherwise the bytes of its text."""
        if self._byte_level:
            with self._guard:
                piece = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and piece and all(c in _BYTE_OF for c in piece):
                return [_BYTE_OF[c] for c in piece]
        return list(self.token_text(token).encode("utf-8"))

    def formatted(self, text: str, chat_template: bool) -> list[int]:
        """The ids of `text` in a trained prompt format, built as training built them (data.encode_prompts)."""
        with self._guard:
            return data.encode_prompts([text], self.tokenizer, chat_template=chat_template)[0][0]

    def end_of_turn(self) -> int | None:
        """The chat template's end-of-turn token (None without a template, or one ending turns in plain text)."""
        if not self.has_chat_template:
            return None
        if not hasattr(self, "_end_of_turn"):
            with self._guard:
                self._end_of_turn = data.stop_ids(self.tokenizer, True)[-1:] or [None]
        found = self._end_of_turn[0]
        return found if found != self.tokenizer.eos_token_id else None

    def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        with self._guard:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def info(self, max_model_len: int) -> dict[str, Any]:
        """vLLM's /tokenizer_info: what a client needs to tokenize like the server (lm-eval reads eos_token)."""
        tok = self.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "vocab_size": len(tok),
            "model_max_length": max_model_len,
            "chat_template": getattr(tok, "chat_template", None),
        }


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:  # a backend that cannot describe itself: fall back to the bytes of the text
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds
