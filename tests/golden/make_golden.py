"""Write the PEFT golden files: tiny base models, adapters saved by PEFT itself, and PEFT's outputs on them.

Run it at the locked versions (PEFT's prefix-tuning must work with the installed transformers):

    .venv/bin/python tests/golden/make_golden.py

Each case directory holds `base/` (the tiny model's config and state dict, saved so that the test does not depend
on how a later transformers initializes weights), `adapter/` (what PEFT's `save_pretrained` wrote, its model card
left out) and `expected.safetensors` (the inputs, PEFT's logits and, for generative models, PEFT's greedy continuation).
`cases.json` lists the cases and the versions that wrote them. tests/test_peft_golden.py reads them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/tiny.py

from tiny import tiny  # noqa: E402
from tiny_seq2seq import tiny_encoder, tiny_seq2seq  # noqa: E402

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
DEC = torch.tensor([[3, 20, 21, 22], [3, 30, 31, 32]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
NEW_TOKENS = 6
CAUSAL = ["gpt2", "llama-gqa", "qwen2", "mistral", "gpt-neox", "phi3"]


def _neutral_bert(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's cache-based prefix shifts BERT's positions by P and ours gives the prefix none: all equal here."""
    with torch.no_grad():
        weight = model.bert.embeddings.position_embeddings.weight
        weight[:] = weight[0]
    return model


def _neutral_seq2seq(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder blind to positions (PEFT shifts BART's by P and gives T5's prefix keys relative bias)."""
    with torch.no_grad():
        if hasattr(model, "model"):
            weight = model.model.decoder.embed_positions.weight
            weight[:] = weight[5]
        else:
            model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
    return model


def _causal(arch: str) -> torch.nn.Module:
    model = tiny(arch)
    if getattr(model.config, "sliding_window", None):  # wider than the inputs: PEFT's prefix would fall out of it
        model.config.sliding_window = 64
    return model


def _cases() -> dict[str, dict]:
    cases = {}
    for arch in CAUSAL:
        cases[f"prefix-{arch}"] = dict(
            make=lambda arch=arch: _causal(arch), auto="AutoModelForCausalLM", generate=True,
            config=peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        )
    for arch in ["bart", "t5"]:
        cases[f"prefix-{arch}"] = dict(
            make=lambda arch=arch: _neutral_seq2seq(tiny_seq2seq(arch, **_layers(arch, 3))),
            auto="AutoModelForSeq2SeqLM", generate=True,
            config=peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4),
        )
    cases["prefix-bert-head"] = dict(
        make=lambda: _neutral_bert(tiny_encoder("bert")), auto="AutoModelForSequenceClassification", generate=False,
        config=peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    )
    cases["prompt-llama-gqa"] = dict(
        make=lambda: tiny("llama-gqa"), auto="AutoModelForCausalLM", generate=True,
        config=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"),
    )
    return cases


def _layers(arch: str, n: int) -> dict[str, int]:
    return {"num_layers": n} if arch == "t5" else {"encoder_layers": n, "decoder_layers": n}


def _inputs(case: dict) -> dict[str, torch.Tensor]:
    if case["auto"] == "AutoModelForSeq2SeqLM":
        return {"input_ids": IDS, "decoder_input_ids": DEC}
    if case["auto"] == "AutoModelForSequenceClassification":
        return {"input_ids": IDS, "attention_mask": MASK}
    return {"input_ids": IDS}


def main() -> None:
    listing = {
        "written_with": {
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "cases": {},
    }
    for name, case in _cases().items():
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        base = case["make"]()
        # The config and the model's own state dict (tied tensors written out in full, names as the model has
        # them): the test builds the model from the config and loads this, with no loader conventions in between.
        base.config.save_pretrained(out / "base")
        (out / "base").mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
        save_file(state, out / "base" / "weights.safetensors")
        torch.manual_seed(3)
        model = peft.get_peft_model(base, case["config"]).eval()
        with torch.no_grad():  # move PEFT's freshly initialized weights somewhere non-trivial
            if name == "prefix-bert-head":
                model.base_model.classifier.modules_to_save["default"].weight.normal_()
            if name.startswith("prompt-"):
                model.prompt_encoder["default"].embedding.weight.add_(0.1)
        model.save_pretrained(out / "adapter")
        os.remove(out / "adapter" / "README.md")
        inputs = _inputs(case)
        expected = dict(inputs)
        with torch.no_grad():
            logits = model(**inputs).logits
        if name.startswith("prompt-"):
            logits = logits[:, case["config"].num_virtual_tokens :]  # PEFT returns the virtual positions too
        expected["logits"] = logits.contiguous()
        if case["generate"]:
            expected["generated"] = model.generate(input_ids=IDS, max_new_tokens=NEW_TOKENS, do_sample=False)
        save_file({k: v.contiguous() for k, v in expected.items()}, out / "expected.safetensors")
        listing["cases"][name] = {"auto_class": case["auto"], "generate": case["generate"]}
        print(f"{name}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) // 1024} KiB")
    (HERE / "cases.json").write_text(json.dumps(listing, indent=2) + "\n")


if __name__ == "__main__":
    main()
