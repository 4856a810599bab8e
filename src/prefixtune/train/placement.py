"""A training run's device and dtypes, decided (and checked) before the run writes anything.

Trainable weights stay float32: AdamW's moments and its small updates need float32's precision (a bfloat16 weight
has 8 bits of mantissa: an update below 1/256 of the weight is lost). The base model loads in the requested dtype
(bfloat16 by default on a GPU that has it) and the methods cast into it where they meet the frozen model (the
prefix batch once per call, PrefixModel.prefix_batch; LoRA, bottleneck and prompt inputs in their own modules). With
`--method full` the base weights are what trains, so they load in float32 and the forward runs under autocast in
the requested dtype (mixed precision). float16 is refused for training: without loss scaling small gradients
underflow.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..devices import Placement, resolve_dtype, resolve_placement
from ..errors import PrefixTuneError
from ..models import refuse_seq2seq
from .distributed import Runtime


def training_placement(
    cfg: TrainConfig, runtime: Runtime, loading: bool
) -> tuple[Placement, torch.dtype, torch.dtype | None]:
    """(placement, the dtype the base loads in, the autocast dtype or None). `loading`: the run loads `cfg.model`
    itself (a model passed in stays where and as it is)."""
    if loading:
        refuse_seq2seq(cfg.model)
    if runtime.distributed:  # the launcher chose each process's device
        placement = Placement(runtime.device, resolve_dtype(cfg.dtype, runtime.device.type))
    else:
        placement = resolve_placement(cfg.device, cfg.dtype)
    if placement.dtype == torch.float16:
        raise PrefixTuneError(
            "--dtype float16 cannot train (no loss scaling here: small gradients underflow); use bfloat16 or float32"
        )
    if cfg.method == "full" and placement.dtype != torch.float32:
        return placement, torch.float32, placement.dtype
    return placement, placement.dtype, None
