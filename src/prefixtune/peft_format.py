"""The saved adapter: PEFT's prefix-tuning format, plus our own fields that PEFT ignores.

    DIR/adapter_config.json        peft_type PREFIX_TUNING, shapes, and a "prefixtune" block
                                   (prefixtune.prompt_format: the prompt format trained with, data/formats.py;
                                   written into any method's adapter_config.json by write_prompt_format)
    DIR/adapter_model.safetensors  prompt_embeddings: (P, L*2*H_kv*D), the collapsed prefix
                                   prefixtune.<location>: encoder-decoder models, one per location (docs/seq2seq.md)
                                   base_model.<head>.<param>: a trained head (PEFT's modules_to_save)
                                   (with a head, "prefixtune.labels" names the head's outputs in order)

Safetensors only: nothing is ever unpickled. Every file is written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .atomic import atomic_save_tensors, atomic_write_bytes
from .errors import PrefixTuneError
from .prefix import LOCATIONS, PrefixConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"
PART_KEY = "prefixtune.{}"  # encoder-decoder: one (P, L_loc*2*H_kv*D) tensor per location, ours
HEAD_KEY = "base_model."  # + module name + parameter name: how PEFT saves modules_to_save (a classifier head)
FORMAT_VERSION = 1


def to_peft_embeddings(kv: Tensor) -> Tensor:
    """(L, 2, H, P, D) -> PEFT's `prompt_embeddings` (P, L*2*H*D)."""
    num_layers, two, heads, p, dim = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(p, num_layers * two * heads * dim).contiguous()


def from_peft_embeddings(emb: Tensor, num_layers: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """PEFT's `prompt_embeddings` (P, L*2*H*D) -> (L, 2, H, P, D)."""
    p = emb.shape[0]
    return emb.view(p, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()


def model_name(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def fingerprint(model: nn.Module, num_layers: int, num_kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Identifies a base model: its shapes and a hash of a fixed sample of its input embeddings.

    The sample is rounded to bfloat16 before hashing so the same weights in float32 or bfloat16 match.
    """
    weight = model.get_input_embeddings().weight.detach().flatten()
    steps = min(4096, weight.numel())
    # integer spacing: a float32 linspace rounds past the end for embeddings of more than 2**24 values
    index = (torch.arange(steps, dtype=torch.long) * (weight.numel() - 1) // max(steps - 1, 1)).to(weight.device)
    sample = weight[index].to(torch.bfloat16).float().cpu().numpy().tobytes()
    return {
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
        "embedding_sha256": hashlib.sha256(sample).hexdigest()[:16],
    }


def peft_seq2seq_slots(num_layers: int) -> list[int]:
    """For each decoder layer i, the layer slot of `prompt_embeddings` that PEFT's seq2seq prefix gives it.

    PEFT (num_transformer_submodules=2) concatenates the (L*2, ...) prefix with itself and splits it in chunks of 4
    (self k, self v, cross k, cross v), then drops the cross part: decoder layer i reads slot 2*i mod L. With an odd
    L that is a permutation; with an even L, layers i and i + L/2 share slot 2*i and odd slots go unread.
    """
    return [(2 * i) % num_layers for i in range(num_layers)]


def to_peft_seq2seq(kv: torch.Tensor) -> torch.Tensor:
    """Decoder prefix (L, 2, H, P, D) -> the slots PEFT reads (unread slots are zero); lossy for even L."""
    slots = torch.zeros_like(kv)
    for layer, slot in reversed(list(enumerate(peft_seq2seq_slots(kv.shape[0])))):
        slots[slot] = kv[layer]  # reversed: with a shared slot, the lower layer wins
    return slots


def from_peft_seq2seq(slots: torch.Tensor) -> torch.Tensor:
    return slots[peft_seq2seq_slots(slots.shape[0])].contiguous()


def save_prefix(
    path: str | os.PathLike[str],
    parts: dict[str, torch.Tensor],
    config: PrefixConfig,
    base_fingerprint: dict[str, Any],
    base: str,
    *,
    encoder_decoder: bool = False,
    head: dict[str, torch.Tensor] | None = None,
    labels: list[str] | None = None,
) -> Path:
    """Save one collapsed prefix, given per location as kv (L_loc, 2, H_kv, P, D), in PEFT's format.

    One stack (causal LM, BERT-style encoder): `prompt_embeddings` is the whole prefix. Encoder-decoder: each
    location is our own tensor `prefixtune.<location>`, and `prompt_embeddings` is the decoder prefix laid out
    for PEFT (written only when there is one). A head is saved as PEFT saves `modules_to_save`; `labels` (the
    class names of its outputs, in order) go into our block.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrefixTuneError(f"cannot create adapter directory {directory}: {e.strerror}") from None
    _, _, heads, p, dim = next(iter(parts.values())).shape
    ours: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "prefix": config.to_dict(),
        "base_model": base_fingerprint,
    }
    if labels is not None:
        ours["labels"] = list(labels)
    if encoder_decoder:
        tensors, num_layers = _encoder_decoder_tensors(parts, ours)
        task_type = "SEQ_2_SEQ_LM"
    else:
        (kv,) = parts.values()
        tensors, num_layers = {PEFT_KEY: to_peft_embeddings(kv)}, kv.shape[0]
        task_type = "SEQ_CLS" if head else "CAUSAL_LM" if "decoder" in parts else "FEATURE_EXTRACTION"
    tensors |= {f"{HEAD_KEY}{config.head}.{k}": v for k, v in (head or {}).items()}
    peft_config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": p,
        "num_layers": num_layers,
        "num_attention_heads": heads,
        "token_dim": heads * dim,
        "encoder_hidden_size": heads * dim,
        "num_transformer_submodules": 2 if encoder_decoder else 1,
        "prefix_projection": False,
        "init_weights": None,
        "modules_to_save": [config.head] if head else None,
        "auto_mapping": None,
        "prefixtune": ours,
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    try:
        atomic_save_tensors(tensors, directory / ADAPTER_WEIGHTS, {"format": "pt"})
        atomic_write_bytes(directory / ADAPTER_CONFIG, (json.dumps(peft_config, indent=2) + "\n").encode())
    except OSError as e:
        raise PrefixTuneError(f"cannot write adapter to {directory}: {e.strerror}") from None
    return directory


def _encoder_decoder_tensors(parts: dict[str, torch.Tensor], ours: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Our tensor per location, plus PEFT's view of the decoder prefix. Records the layer counts in `ours`."""
    tensors = {PART_KEY.format(loc): to_peft_embeddings(kv) for loc, kv in parts.items()}
    ours["layers"] = {loc: kv.shape[0] for loc, kv in parts.items()}
    decoder = parts.get("decoder")
    if decoder is None:  # PEFT cannot read an adapter without a decoder prefix: it finds no prompt_embeddings
        return tensors, next((kv.shape[0] for loc, kv in parts.items() if loc == "cross"), 0)
    tensors[PEFT_KEY] = to_peft_embeddings(to_peft_seq2seq(decoder))
    ours["peft_reads_exactly"] = bool(torch.equal(from_peft_seq2seq(to_peft_seq2seq(decoder)), decoder))
    return tensors, decoder.shape[0]


@dataclass
class SavedPrefix:
    """A prefix read from disk, checked for internal consistency (not yet against a model)."""

    path: Path
    config: PrefixConfig
    # location -> kv (L_loc, 2, H_kv, P, D) float32; "self" when the location is not recorded (a one-stack
    # adapter saved by PEFT or by an older prefixtune): the self-attention of a causal LM or an encoder.
    parts: dict[str, torch.Tensor]
    base: str  # base_model_name_or_path as recorded
    base_fingerprint: dict[str, Any] | None  # None for adapters saved by PEFT
    head: dict[str, torch.Tensor] | None = None  # the head's state dict (config.head names the module)
    labels: list[str] | None = None  # class names of the head's outputs, in order (None: not recorded)


def _require_int(config: dict[str, Any], key: str, where: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PrefixTuneError(f"{where}: field {key!r} is missing or not a non-negative integer ({value!r})")
    return value


def _read_json(config_path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8, bad JSON, a 5000-digit number
        raise PrefixTuneError(f"{config_path}: not valid JSON ({str(e)[:200]}); re-save the adapter") from None
    if not isinstance(raw, dict):
        raise PrefixTuneError(f"{config_path}: expected a JSON object")
    return raw


def _embeddings(tensors: dict[str, torch.Tensor], key: str, expected: tuple[int, int], where: Path) -> torch.Tensor:
    emb = tensors.get(key)
    if emb is None:
        raise PrefixTuneError(f"{where}: tensor {key!r} not found (keys: {sorted(tensors)})")
    if tuple(emb.shape) != expected or not emb.is_floating_point():
        raise PrefixTuneError(
            f"{where}: {key} is {tuple(emb.shape)} {emb.dtype}, the config says a float tensor {expected}"
        )
    emb = emb.float()  # before the check: isfinite has no float8 kernel, and float64 may overflow float32
    if not torch.isfinite(emb).all():
        raise PrefixTuneError(f"{where}: {key} holds NaN or infinite values (or values too large for float32)")
    return emb


def read_prefix(path: str | os.PathLike[str]) -> SavedPrefix:
    """Read and validate an adapter directory saved by prefixtune or by PEFT's prefix tuning."""
    directory = Path(path)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise PrefixTuneError(f"{directory} is not an adapter directory: {ADAPTER_CONFIG} not found")
    raw = _read_json(config_path)
    if raw.get("peft_type") != "PREFIX_TUNING":
        raise PrefixTuneError(f"{config_path}: peft_type is {raw.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    p = _require_int(raw, "num_virtual_tokens", config_path)
    num_layers = _require_int(raw, "num_layers", config_path)
    heads = _require_int(raw, "num_attention_heads", config_path)
    token_dim = _require_int(raw, "token_dim", config_path)
    submodules = raw.get("num_transformer_submodules") or 1
    if submodules not in (1, 2):
        raise PrefixTuneError(f"{config_path}: num_transformer_submodules is {submodules!r}, expected 1 or 2")
    if heads == 0 or token_dim % heads:
        raise PrefixTuneError(f"{config_path}: token_dim {token_dim} is not a multiple of num_attention_heads {heads}")
    if not weights_path.is_file():
        raise PrefixTuneError(f"{directory}: {ADAPTER_WEIGHTS} not found (only safetensors adapters are read)")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises several types for corrupt or truncated files
        raise PrefixTuneError(f"{weights_path}: corrupt or truncated safetensors file ({e})") from None
    ours = raw.get("prefixtune")
    if isinstance(ours, dict) and isinstance(ours.get("prefix"), dict):
        config = PrefixConfig.from_dict(ours["prefix"])
        base_fp = ours.get("base_model") if isinstance(ours.get("base_model"), dict) else None
    else:  # saved by PEFT: positions follow PEFT's convention
        ours, base_fp = {}, None
        config = PrefixConfig(num_virtual_tokens=p, reparameterize=False, init="random", head=_peft_head(raw, tensors))

    def kv(key: str, layers: int) -> torch.Tensor:
        emb = _embeddings(tensors, key, (p, layers * 2 * token_dim), weights_path)
        return from_peft_embeddings(emb, layers, heads, token_dim // heads)

    layers = ours.get("layers")
    if submodules == 2 and isinstance(layers, dict):  # ours, encoder-decoder: one tensor per location
        if config.locations != tuple(loc for loc in LOCATIONS if loc in layers):
            raise PrefixTuneError(f"{config_path}: prefixtune.layers {layers!r} disagrees with the prefix locations")
        parts = {loc: kv(PART_KEY.format(loc), _require_int(layers, loc, config_path)) for loc in layers}
    elif submodules == 2:  # PEFT's seq2seq prefix: the decoder's self-attention only
        parts = {"decoder": from_peft_seq2seq(kv(PEFT_KEY, num_layers))}
        config = replace(config, locations=("decoder",))
    else:
        parts = {"self": kv(PEFT_KEY, num_layers)}
        if config.locations is not None and len(config.locations) == 1:
            parts = {config.locations[0]: parts["self"]}
    if config.num_virtual_tokens != p:
        raise PrefixTuneError(f"{config_path}: prefixtune.prefix.num_virtual_tokens disagrees with num_virtual_tokens")
    head = None
    if config.head not in (None, "auto"):
        start = f"{HEAD_KEY}{config.head}."
        head = {k[len(start) :]: v.float() for k, v in tensors.items() if k.startswith(start)}
        if not head:
            raise PrefixTuneError(f"{weights_path}: the config names head {config.head!r} but no tensors {start}*")
    labels = ours.get("labels")
    if labels is not None and (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise PrefixTuneError(f"{config_path}: prefixtune.labels must be a list of distinct strings, got {labels!r}")
    base = str(raw.get("base_model_name_or_path") or "?")
    return SavedPrefix(directory, config, parts, base, base_fp, head, labels if head is not None else None)


def _peft_head(raw: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str | None:
    """The modules_to_save entry of a PEFT adapter that has saved tensors (a classifier head), if any."""
    listed = raw.get("modules_to_save") or []
    listed = [listed] if isinstance(listed, str) else listed if isinstance(listed, list) else []
    names = [n for n in listed if isinstance(n, str)]
    return next((n for n in names if any(k.startswith(f"{HEAD_KEY}{n}.") for k in tensors)), None)


# ----- the prompt format an adapter was trained with -----------------------------------------------------------

PROMPT_FORMAT_KEY = "prompt_format"  # in the "prefixtune" block, which PEFT's config classes ignore


def _config_files(directory: Path) -> list[Path]:
    """adapter_config.json of DIR, else those one level down (lora+prefix keeps one per part)."""
    own = directory / ADAPTER_CONFIG
    return [own] if own.is_file() else sorted(directory.glob(f"*/{ADAPTER_CONFIG}"))


def write_prompt_format(path: str | os.PathLike[str], prompt_format: dict[str, Any]) -> bool:
    """Record the prompt format in the adapter's adapter_config.json (each rewritten atomically). False when the
    directory has none (methods saved in their own files: bottleneck adapters, full fine-tuning)."""
    files = _config_files(Path(path))
    for config_path in files:
        raw = _read_json(config_path)
        ours = raw.get("prefixtune") if isinstance(raw.get("prefixtune"), dict) else {}
        raw["prefixtune"] = {**ours, PROMPT_FORMAT_KEY: prompt_format}
        try:
            atomic_write_bytes(config_path, (json.dumps(raw, indent=2) + "\n").encode())
        except OSError as e:
            raise PrefixTuneError(f"cannot write {config_path}: {e.strerror}") from None
    return bool(files)


def read_prompt_format(path: str | os.PathLike[str]) -> dict[str, Any] | str | None:
    """The saved prompt format (as written), or None for adapters saved without one (older ones, PEFT's)."""
    for config_path in _config_files(Path(path)):
        ours = _read_json(config_path).get("prefixtune")
        if isinstance(ours, dict) and ours.get(PROMPT_FORMAT_KEY) is not None:
            return ours[PROMPT_FORMAT_KEY]
    return None
