"""PEFT interop that does not depend on PEFT keeping up with transformers.

tests/golden/ holds adapters written by PEFT itself at the locked versions (tests/golden/make_golden.py), on tiny
base models saved beside them, with PEFT's logits and greedy continuations. We load them and must reproduce those
outputs; and what we save for the same shapes must carry every field PEFT writes, with PEFT's values, and the same
tensors (names, shapes, dtypes). These run on every transformers version, including those where PEFT's own
prefix-tuning does not (tests/peft_support.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

import prefixtune
from prefixtune import PrefixConfig
from prefixtune.methods.registry import load_trained

GOLDEN = Path(__file__).parent / "golden"
LISTING = json.loads((GOLDEN / "cases.json").read_text())
CASES = sorted(LISTING["cases"])
PREFIX_CASES = [c for c in CASES if c.startswith("prefix-")]
# Fields whose values describe the writer, not the adapter: PEFT writes its own version, and the base model's
# name (null for these unnamed tiny models; ours records the name we know it by).
WRITER_FIELDS = {"peft_version", "base_model_name_or_path"}


def _base(case: str) -> torch.nn.Module:
    """The saved tiny base model: built from its config, its saved state dict loaded (strictly) into it.

    Not `from_pretrained`: late in a full suite run transformers 5.23's loader sometimes leaves a tied LM head on
    the meta device (the fault sources.py guards against for the built-in model), which is not what these test.
    """
    directory = GOLDEN / case / "base"
    auto = getattr(transformers, LISTING["cases"][case]["auto_class"])
    model = auto.from_config(transformers.AutoConfig.from_pretrained(directory), attn_implementation="sdpa")
    model.load_state_dict(load_file(directory / "weights.safetensors"))
    return model.eval()


def _expected(case: str) -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / case / "expected.safetensors")


def _inputs(expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in expected.items() if k in ("input_ids", "decoder_input_ids", "attention_mask")}


@pytest.mark.parametrize("case", CASES)
def test_we_load_what_peft_wrote_with_peft_outputs(case: str) -> None:
    expected = _expected(case)
    if case.startswith("prompt-"):
        model = load_trained(_base(case), GOLDEN / case / "adapter")
    else:
        model = prefixtune.load_adapter(_base(case), GOLDEN / case / "adapter", name="golden")
    with torch.no_grad():
        logits = model(**_inputs(expected)).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    if "generated" in expected:
        generated = model.generate(input_ids=expected["input_ids"], max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, expected["generated"])


def _tensor_layout(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(path, framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("case", PREFIX_CASES)
def test_our_files_have_peft_fields_and_tensors(case: str, tmp_path: Path) -> None:
    theirs_dir = GOLDEN / case / "adapter"
    theirs = json.loads((theirs_dir / "adapter_config.json").read_text())
    # Our prefix with the shape PEFT's has (what our loader makes of PEFT's file: length, locations, head).
    read = prefixtune.load_adapter(_base(case), theirs_dir, name="golden").adapter_config("golden")
    config = PrefixConfig(num_virtual_tokens=read.num_virtual_tokens, init="random", locations=read.locations,
                          head=read.head)
    prefixtune.attach(_base(case), config).save_adapter(tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for field, value in theirs.items():
        if field in WRITER_FIELDS:
            continue
        assert field in ours, f"{case}: PEFT writes {field!r}, we do not"
        if field == "modules_to_save" and value is not None:
            # PEFT writes its task defaults for SEQ_CLS ("classifier", "score", twice over) and adds them again
            # when it loads; we name the one head module there is. PEFT reading ours is the live test's job.
            assert ours[field] and set(ours[field]) <= set(value), f"{case}: {field} {ours[field]} vs {value}"
            continue
        assert ours[field] == value, f"{case}: {field} is {ours[field]!r} in ours, {value!r} in PEFT's"
    assert set(ours) - set(theirs) - WRITER_FIELDS == {"prefixtune"}  # our own block, which PEFT ignores
    ours_tensors = _tensor_layout(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_tensors = _tensor_layout(theirs_dir / "adapter_model.safetensors")
    # Encoder-decoder prefixes also carry our per-location tensors (`prefixtune.<location>`), which PEFT ignores.
    shared = {k: v for k, v in ours_tensors.items() if not k.startswith("prefixtune.")}
    assert shared == theirs_tensors


def test_golden_files_were_written_by_the_locked_peft() -> None:
    """Regenerate them (make_golden.py) when the lock moves PEFT, so they keep meaning 'what PEFT writes'."""
    lock = (Path(__file__).parents[1] / "requirements" / "lock.txt").read_text().splitlines()
    locked = dict(line.split("==") for line in lock if "==" in line and not line.startswith("#"))
    assert LISTING["written_with"]["peft"] == locked["peft"]
