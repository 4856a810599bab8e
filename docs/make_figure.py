"""Draws docs/prefix_attention.png: where the prefix enters one attention layer (run: python docs/make_figure.py)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch


def box(ax, x, y, w, h, text, color, size=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def arrow(ax, a, b):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color="#333", lw=1))


fig, ax = plt.subplots(figsize=(9, 4.6), dpi=110)
ax.set_xlim(0, 10)
ax.set_ylim(0, 5.2)
ax.axis("off")
frozen, prefix, ours = "#dde6f0", "#f6c667", "#b7e1b0"
box(ax, 0.2, 0.3, 2.0, 0.6, "hidden states (B, T, d)", frozen)
box(ax, 0.2, 1.4, 2.0, 0.7, "q/k/v projections\n+ RoPE (frozen)", frozen)
arrow(ax, (1.2, 0.9), (1.2, 1.4))
box(ax, 2.8, 2.7, 1.6, 0.6, "query (B,H,T,D)", frozen, 8)
box(ax, 2.8, 1.9, 1.6, 0.6, "key (B,Hkv,S,D)", frozen, 8)
box(ax, 2.8, 1.1, 1.6, 0.6, "value (B,Hkv,S,D)", frozen, 8)
for y in (3.0, 2.2, 1.4):
    arrow(ax, (2.2, 1.75), (2.8, y))
box(ax, 0.2, 3.7, 2.6, 1.2, "prefix bank: one trainable\nkv (L,2,Hkv,P,D) per adapter\n(MLP-reparameterized in training)", prefix, 8)
box(ax, 5.0, 1.0, 2.3, 3.1,
    "prefixtune attention function\n(registered with transformers'\nAttentionInterface)\n\n"
    "per row: cat([prefix_k, key])\ncat([prefix_v, value])\nmask: prefix columns visible\n"
    "(padding / __base__ rows hidden)", ours, 8)
arrow(ax, (2.8, 4.3), (5.0, 3.6))
ax.text(3.1, 4.45, "adapter_names: one per row", fontsize=8, style="italic")
for y in (3.0, 2.2, 1.4):
    arrow(ax, (4.4, y), (5.0, y))
box(ax, 7.8, 2.1, 2.0, 0.9, "stock sdpa / eager\nkernel (GQA, windows)", frozen, 8)
arrow(ax, (7.3, 2.55), (7.8, 2.55))
box(ax, 7.8, 0.4, 2.0, 0.9, "KV cache: real tokens\nonly (no prefix)", frozen, 8)
arrow(ax, (3.6, 1.1), (7.8, 0.85))
ax.text(5.0, 4.75, "one frozen model, many prefixes, mixed in one batch", fontsize=10, weight="bold")
fig.tight_layout()
fig.savefig(Path(__file__).with_name("prefix_attention.png"))
