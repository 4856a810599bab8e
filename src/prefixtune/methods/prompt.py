"""Prompt tuning (Lester et al., 2021): P trainable soft tokens prepended at the input embeddings only.

Several named prompts live on one frozen base model and a batch may mix them row by row (`adapter_names`).
Layout of one batch, P = the longest prompt used in it, rows' prompts right-aligned against the real tokens:

    row with a 2-token prompt, P = 4:   [pad pad p0 p1 | t0 t1 t2]   mask [0 0 1 1 | m m m]
    position ids: cumsum(mask) - 1, so a row's prompt sits at 0..P_r-1 and its tokens at P_r.. (PEFT's layout)

The extra columns are plain left padding, which `generate` and its KV cache already handle. Logits come back for
the real tokens only (the same columns as the base model's). Saved in PEFT's PROMPT_TUNING format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn

from .. import atomic, peft_format
from ..data.describe import NO_TEXT
from ..errors import PrefixTuneError
from ..model import BASE, check_adapter_name

PromptInit = Literal["random", "vocab", "text", "data"]


@dataclass
class PromptConfig:
    """num_virtual_tokens: P soft tokens. init: "random" (normal, scaled like the embedding matrix), "vocab"
    (embeddings of sampled vocabulary tokens; Lester et al. found vocabulary/text inits beat random) or "text"
    (embeddings of `init_text`, tiled or cut to P tokens) or "data" (as "text", for a description `prefixtune
    train` derives from the training data; data/describe.py)."""

    num_virtual_tokens: int = 20
    init: PromptInit = "vocab"
    init_text: str | None = None

    def __post_init__(self) -> None:
        if self.init_text is not None and not isinstance(self.init_text, str):
            raise PrefixTuneError(f"init_text must be text, got {self.init_text!r}")
        if self.init_text is not None and self.init == "vocab":
            self.init = "text"
        p = self.num_virtual_tokens
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise PrefixTuneError(f"num_virtual_tokens must be an integer >= 1, got {self.num_virtual_tokens!r}")
        if self.init not in ("random", "vocab", "text", "data"):
            raise PrefixTuneError(f"init must be 'random', 'vocab', 'text' or 'data', got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise PrefixTuneError("init='text' needs init_text, e.g. init_text='table-to-text:'")


class PromptModel(nn.Module):
    """A frozen causal LM plus named soft prompts. forward/generate take `adapter_names` (one per row)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.base_model = model
        self.tokenizer = tokenizer
        self.prompts = nn.ParameterDict()  # name -> (P, H)
        self.configs: dict[str, PromptConfig] = {}
        self.active_adapter: str | None = None
        for param in model.parameters():
            param.requires_grad_(False)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.prompts.keys())

    def add_adapter(
        self, name: str, config_or_path: PromptConfig | str | os.PathLike[str], *, force: bool = False
    ) -> PromptModel:
        """Add a new soft prompt from a `PromptConfig`, or load a saved one (ours or PEFT's) from a directory."""
        check_adapter_name(name)
        if name in self.prompts:
            raise PrefixTuneError(f"prompt {name!r} already exists; pick another name")
        embedding = self.base_model.get_input_embeddings().weight
        if isinstance(config_or_path, PromptConfig):
            config, prompt = config_or_path, self._initial_prompt(config_or_path)
        else:
            config, prompt = read_prompt(config_or_path, self.base_model, force=force)
        self.prompts[name] = nn.Parameter(prompt.float().to(embedding.device))
        self.configs[name] = config
        self.active_adapter = self.active_adapter or name
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.prompts.values() if p.requires_grad]

    def save_adapter(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        """Save one prompt (the active one by default) in PEFT's prompt-tuning format."""
        name = self._require(name or self.active_adapter)
        save_prompt(path, self.prompts[name].detach(), self.configs[name], self.base_model)

    def save_trained(self, directory: str | os.PathLike[str]) -> None:
        self.save_adapter(directory)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward with each row's soft prompt in front; logits for the real tokens only."""
        batch = self._extend(input_ids, inputs_embeds, attention_mask, adapter_names)
        if labels is not None:
            ignore = torch.full((labels.shape[0], batch["width"]), -100, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat([ignore, labels], dim=1)
        width = batch.pop("width")
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):  # input positions -> positions behind the soft prompts (aligned at width)
            kwargs["logits_to_keep"] = keep + width
        output = self.base_model(**batch, **kwargs)
        if getattr(output, "logits", None) is not None and output.logits.shape[1] == batch["inputs_embeds"].shape[1]:
            output.logits = output.logits[:, width:]
        return output

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """`transformers` generate from the prompted embeddings; returns input_ids + new tokens like the base's."""
        batch = self._extend(input_ids, inputs_embeds, attention_mask, adapter_names)
        del batch["width"], batch["position_ids"]  # generate derives the same positions from the mask
        output = self.base_model.generate(**batch, **kwargs)
        if input_ids is None:
            return output
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        prompt_ids = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt_ids.to(sequences.device), sequences], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    # ----- internals ----------------------------------------------------------------------------------------

    def _require(self, name: str | None) -> str:
        if name is None or name not in self.prompts:
            raise PrefixTuneError(f"unknown prompt {name!r}; this model has {self.adapter_names}")
        return name

    def _extend(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        adapter_names: Sequence[str] | None,
    ) -> dict[str, Any]:
        """inputs_embeds (B, P+T, H), attention_mask (B, P+T), position_ids (B, P+T) and P for a batch."""
        if inputs_embeds is None:
            if input_ids is None:
                raise PrefixTuneError("pass input_ids or inputs_embeds")
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        rows, length, _ = inputs_embeds.shape
        names = self._row_names(adapter_names, rows)
        used = [n for n in dict.fromkeys(names) if n != BASE]
        width = max((self.prompts[n].shape[0] for n in used), default=0)
        hidden, device = inputs_embeds.shape[2], inputs_embeds.device
        # One left-padded bank entry per used prompt (+ an empty one for BASE), then one gather for all rows.
        bank = [nn.functional.pad(self.prompts[n], (0, 0, width - self.prompts[n].shape[0], 0)) for n in used]
        bank.append(torch.zeros(width, hidden, device=device))
        slot = {n: i for i, n in enumerate(used)} | {BASE: len(used)}
        index = torch.tensor([slot[n] for n in names], device=device)
        soft = torch.stack(bank)[index].to(inputs_embeds.dtype)  # (B, P, H)
        row_len = torch.tensor([self.prompts[n].shape[0] if n != BASE else 0 for n in names], device=device)
        soft_mask = torch.arange(width, device=device)[None, :] >= (width - row_len)[:, None]  # (B, P)
        if attention_mask is None:
            attention_mask = torch.ones(rows, length, dtype=torch.long, device=device)
        mask = torch.cat([soft_mask.to(attention_mask.dtype), attention_mask], dim=1)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        embeds = torch.cat([soft, inputs_embeds], dim=1)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids, "width": width}

    def _row_names(self, adapter_names: Sequence[str] | None, rows: int) -> list[str]:
        if adapter_names is None:
            return [self.active_adapter or BASE] * rows
        if isinstance(adapter_names, str):
            raise PrefixTuneError("adapter_names must be a list with one name per batch row, not a string")
        names = list(adapter_names)
        if len(names) != rows:
            raise PrefixTuneError(f"adapter_names has {len(names)} names for a batch of {rows} rows; give one per row")
        unknown = sorted({n for n in names if n != BASE and n not in self.prompts})
        if unknown:
            raise PrefixTuneError(f"unknown prompt names {unknown}; this model has {self.adapter_names} and {BASE!r}")
        return names

    @torch.no_grad()
    def _initial_prompt(self, config: PromptConfig) -> torch.Tensor:
        embedding = self.base_model.get_input_embeddings()
        p = config.num_virtual_tokens
        if config.init == "random":
            return torch.randn(p, embedding.weight.shape[1]) * embedding.weight.float().std().item()
        if config.init == "vocab":
            vocab = embedding.weight.shape[0]
            if self.tokenizer is not None:
                vocab = min(vocab, len(self.tokenizer))
            ids = torch.randint(0, vocab, (p,))
        else:
            if not config.init_text:  # init="data" outside `prefixtune train`
                raise PrefixTuneError(NO_TEXT)
            if self.tokenizer is None:
                raise PrefixTuneError("init='text' needs a tokenizer: pass tokenizer= when building the prompt")
            text_ids = self.tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            if not text_ids:
                raise PrefixTuneError(f"init_text {config.init_text!r} has no tokens")
            ids = torch.tensor((text_ids * (p // len(text_ids) + 1))[:p])
        return embedding(ids.to(embedding.weight.device)).float().cpu()


def build_prompt(model: nn.Module, config: PromptConfig, tokenizer: Any = None) -> PromptModel:
    return PromptModel(model, tokenizer).add_adapter("default", config)


def load_prompt(model: nn.Module, directory: str | os.PathLike[str], *, force: bool = False) -> PromptModel:
    return PromptModel(model).add_adapter("default", directory, force=force)


# ----- the saved format: PEFT's PROMPT_TUNING -------------------------------------------------------------------


def _base_identity(model: nn.Module) -> dict[str, Any]:
    full = peft_format.fingerprint(model, 0, 0, 0)
    return {k: full[k] for k in ("model_type", "vocab_size", "embedding_sha256")}


def save_prompt(path: str | os.PathLike[str], prompt: torch.Tensor, config: PromptConfig, model: nn.Module) -> Path:
    """Write `adapter_config.json` (peft_type PROMPT_TUNING) and `adapter_model.safetensors` (prompt_embeddings)."""
    directory = Path(path)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    p, hidden = prompt.shape
    peft_config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": peft_format.model_name(model),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": p,
        "token_dim": hidden,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "num_layers": getattr(text, "num_hidden_layers", None),
        # "RANDOM" so that PEFT never tries to fetch a tokenizer on load; our real init is recorded below.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "modules_to_save": None,
        "auto_mapping": None,
        "prefixtune": {
            "format_version": 1,
            "method": "prompt",
            "prompt": asdict(config),
            "base_model": _base_identity(model),
        },
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        weights = {peft_format.PEFT_KEY: prompt.float().cpu().contiguous()}
        atomic.atomic_save_tensors(weights, directory / peft_format.ADAPTER_WEIGHTS, {"format": "pt"})
        atomic.atomic_write_bytes(
            directory / peft_format.ADAPTER_CONFIG, (json.dumps(peft_config, indent=2) + "\n").encode()
        )
    except OSError as e:
        raise PrefixTuneError(f"cannot write prompt to {directory}: {e.strerror}") from None
    return directory


def read_prompt(
    path: str | os.PathLike[str], model: nn.Module, *, force: bool = False
) -> tuple[PromptConfig, torch.Tensor]:
    """Read a prompt saved by prefixtune or by PEFT's prompt tuning, checked against `model`."""
    directory = Path(path)
    config_path, weights_path = directory / peft_format.ADAPTER_CONFIG, directory / peft_format.ADAPTER_WEIGHTS
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8, bad JSON, a 5000-digit number
        raise PrefixTuneError(f"{config_path}: cannot read a prompt-tuning config ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "PROMPT_TUNING":
        peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
        raise PrefixTuneError(f"{config_path}: not a prompt-tuning adapter (peft_type {peft_type!r})")
    try:
        prompt = load_file(weights_path)[peft_format.PEFT_KEY]
    except FileNotFoundError:
        raise PrefixTuneError(f"{directory}: {peft_format.ADAPTER_WEIGHTS} not found") from None
    except KeyError:
        raise PrefixTuneError(f"{weights_path}: tensor {peft_format.PEFT_KEY!r} not found") from None
    except Exception as e:  # safetensors raises several types for corrupt files
        raise PrefixTuneError(f"{weights_path}: corrupt or truncated safetensors file ({e})") from None
    hidden = model.get_input_embeddings().weight.shape[1]
    if prompt.ndim != 2 or prompt.shape[1] != hidden or prompt.shape[0] != raw.get("num_virtual_tokens"):
        raise PrefixTuneError(
            f"{weights_path}: prompt of shape {tuple(prompt.shape)} does not fit this model "
            f"({peft_format.model_name(model)}, hidden size {hidden}; "
            f"the config says num_virtual_tokens={raw.get('num_virtual_tokens')})"
        )
    if not prompt.is_floating_point():
        raise PrefixTuneError(f"{weights_path}: {peft_format.PEFT_KEY} is {prompt.dtype}, not a float tensor")
    prompt = prompt.float()  # before the check: isfinite has no float8 kernel, and float64 may overflow float32
    if not torch.isfinite(prompt).all():
        raise PrefixTuneError(f"{weights_path}: {peft_format.PEFT_KEY} holds NaN or infinite values")
    ours = raw.get("prefixtune") if isinstance(raw.get("prefixtune"), dict) else {}
    saved_base = ours.get("base_model")
    if isinstance(saved_base, dict) and saved_base != _base_identity(model) and not force:
        raise PrefixTuneError(
            f"prompt {directory} was trained on {raw.get('base_model_name_or_path')}, not on this model "
            f"{peft_format.model_name(model)}; pass force=True (--force) to load it anyway"
        )
    fields = ours.get("prompt") if isinstance(ours.get("prompt"), dict) else {"init": "random"}
    unknown = sorted(set(fields) - {f.name for f in dataclass_fields(PromptConfig)})
    if unknown:
        raise PrefixTuneError(f"{config_path}: unknown prefixtune.prompt fields {unknown}; re-save the prompt")
    config = PromptConfig(**{**fields, "num_virtual_tokens": int(prompt.shape[0])})
    return config, prompt
