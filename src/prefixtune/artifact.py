"""The saved adapter: PEFT's prefix-tuning format, plus our own fields that PEFT ignores.

    DIR/adapter_config.json        peft_type PREFIX_TUNING, shapes, and a "prefixtune" block
    DIR/adapter_model.safetensors  prompt_embeddings: (P, L*2*H_kv*D), the collapsed prefix

Safetensors only: nothing is ever unpickled. Every file is written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import PrefixTuneError
from .methods.prefix import PrefixConfig, from_peft_embeddings, to_peft_embeddings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"
FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str]
) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_name(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def fingerprint(model: nn.Module, num_layers: int, num_kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Identifies a base model: its shapes and a hash of a fixed sample of its input embeddings.

    The sample is rounded to bfloat16 before hashing so the same weights in float32 or bfloat16 match.
    """
    weight = model.get_input_embeddings().weight.detach().flatten()
    index = torch.linspace(0, weight.numel() - 1, steps=min(4096, weight.numel())).long().to(weight.device)
    sample = weight[index].to(torch.bfloat16).float().cpu().numpy().tobytes()
    return {
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
        "embedding_sha256": hashlib.sha256(sample).hexdigest()[:16],
    }


def save_prefix(
    path: str | os.PathLike[str], kv: torch.Tensor, config: PrefixConfig, base_fingerprint: dict[str, Any], base: str
) -> Path:
    """Save one collapsed prefix kv (L, 2, H_kv, P, D) in PEFT's format. Returns the directory."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrefixTuneError(f"cannot create adapter directory {directory}: {e.strerror}") from None
    num_layers, _, heads, p, dim = kv.shape
    peft_config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": p,
        "num_layers": num_layers,
        "num_attention_heads": heads,
        "token_dim": heads * dim,
        "encoder_hidden_size": heads * dim,
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "init_weights": None,
        "modules_to_save": None,
        "auto_mapping": None,
        "prefixtune": {
            "format_version": FORMAT_VERSION,
            "prefix": config.to_dict(),
            "base_model": base_fingerprint,
        },
    }
    try:
        atomic_save_tensors(
            {PEFT_KEY: to_peft_embeddings(kv.float().cpu())}, directory / ADAPTER_WEIGHTS, {"format": "pt"}
        )
        atomic_write_bytes(directory / ADAPTER_CONFIG, (json.dumps(peft_config, indent=2) + "\n").encode())
    except OSError as e:
        raise PrefixTuneError(f"cannot write adapter to {directory}: {e.strerror}") from None
    return directory


@dataclass
class SavedPrefix:
    """A prefix read from disk, checked for internal consistency (not yet against a model)."""

    path: Path
    config: PrefixConfig
    kv: torch.Tensor  # (L, 2, H_kv, P, D) float32
    base: str  # base_model_name_or_path as recorded
    base_fingerprint: dict[str, Any] | None  # None for adapters saved by PEFT


def _require_int(config: dict[str, Any], key: str, where: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PrefixTuneError(f"{where}: field {key!r} is missing or not a non-negative integer ({value!r})")
    return value


def read_prefix(path: str | os.PathLike[str]) -> SavedPrefix:
    """Read and validate an adapter directory saved by prefixtune or by PEFT's prefix tuning."""
    directory = Path(path)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise PrefixTuneError(f"{directory} is not an adapter directory: {ADAPTER_CONFIG} not found")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrefixTuneError(f"{config_path}: not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(raw, dict):
        raise PrefixTuneError(f"{config_path}: expected a JSON object")
    if raw.get("peft_type") != "PREFIX_TUNING":
        raise PrefixTuneError(f"{config_path}: peft_type is {raw.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    p = _require_int(raw, "num_virtual_tokens", config_path)
    num_layers = _require_int(raw, "num_layers", config_path)
    heads = _require_int(raw, "num_attention_heads", config_path)
    token_dim = _require_int(raw, "token_dim", config_path)
    if raw.get("num_transformer_submodules", 1) != 1:
        raise PrefixTuneError(f"{config_path}: encoder-decoder PEFT prefixes are not supported by the decoder loader")
    if heads == 0 or token_dim % heads:
        raise PrefixTuneError(f"{config_path}: token_dim {token_dim} is not a multiple of num_attention_heads {heads}")
    if not weights_path.is_file():
        raise PrefixTuneError(f"{directory}: {ADAPTER_WEIGHTS} not found (only safetensors adapters are read)")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises several types for corrupt or truncated files
        raise PrefixTuneError(f"{weights_path}: corrupt or truncated safetensors file ({e})") from None
    emb = tensors.get(PEFT_KEY)
    if emb is None:
        raise PrefixTuneError(f"{weights_path}: tensor {PEFT_KEY!r} not found (keys: {sorted(tensors)})")
    expected = (p, num_layers * 2 * token_dim)
    if tuple(emb.shape) != expected or not emb.is_floating_point():
        raise PrefixTuneError(
            f"{weights_path}: {PEFT_KEY} is {tuple(emb.shape)} {emb.dtype}, the config says a float tensor {expected}"
        )
    if not torch.isfinite(emb).all():
        raise PrefixTuneError(f"{weights_path}: {PEFT_KEY} holds NaN or infinite values")
    ours = raw.get("prefixtune")
    if isinstance(ours, dict) and isinstance(ours.get("prefix"), dict):
        config = PrefixConfig.from_dict(ours["prefix"])
        base_fp = ours.get("base_model") if isinstance(ours.get("base_model"), dict) else None
    else:  # saved by PEFT: positions follow PEFT's convention
        config, base_fp = PrefixConfig(num_virtual_tokens=p, reparameterize=False, init="random"), None
    if config.num_virtual_tokens != p:
        raise PrefixTuneError(f"{config_path}: prefixtune.prefix.num_virtual_tokens disagrees with num_virtual_tokens")
    kv = from_peft_embeddings(emb.float(), num_layers, heads, token_dim // heads)
    return SavedPrefix(directory, config, kv, str(raw.get("base_model_name_or_path") or "?"), base_fp)
