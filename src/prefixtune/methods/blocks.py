"""Find a decoder's blocks, their attention and MLP sublayers, and the final norm, without per-architecture code.

Used by the bottleneck adapters (hooks on attention/MLP outputs) and by `full --top-layers K`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import PrefixTuneError

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")


@dataclass
class Blocks:
    """The decoder layer stack of a causal LM."""

    layers: nn.ModuleList  # the decoder layers, bottom to top
    final_norm: nn.Module | None  # the norm after the last layer (ln_f, norm, final_layer_norm), if any

    def attention(self, index: int) -> nn.Module:
        return _sublayer(self.layers[index], "Attention", _ATTENTION_NAMES)

    def mlp(self, index: int) -> nn.Module:
        return _sublayer(self.layers[index], "MLP", _MLP_NAMES)


def find_blocks(model: nn.Module) -> Blocks:
    """The `nn.ModuleList` of decoder layers: the one with `num_hidden_layers` same-class entries (else the longest)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    wanted = getattr(text_config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise PrefixTuneError(f"{type(model).__name__}: no stack of decoder layers (nn.ModuleList) found")
    exact = [c for c in candidates if len(c[1]) == wanted]
    name, layers = (exact or sorted(candidates, key=lambda c: -len(c[1])))[0]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    norms = [m for m in parent.children() if m is not layers and "norm" in type(m).__name__.lower()]
    return Blocks(layers=layers, final_norm=norms[-1] if norms else None)


def _sublayer(layer: nn.Module, class_word: str, names: tuple[str, ...]) -> nn.Module:
    """A layer's direct child whose class name contains `class_word` (LlamaAttention, GPT2MLP), else a known name."""
    children = dict(layer.named_children())
    by_class = [m for m in children.values() if class_word.lower() in type(m).__name__.lower()]
    if len(by_class) == 1:
        return by_class[0]
    for name in names:
        if name in children:
            return children[name]
    raise PrefixTuneError(
        f"{type(layer).__name__}: cannot find its {class_word} sublayer among {sorted(children)}; "
        "bottleneck adapters need a decoder layer with one attention and one MLP child"
    )
