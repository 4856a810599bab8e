"""Prefix-tuning with TRL's `SFTTrainer`: E2E as prompt/completion pairs on smollm2-135m (or a tiny model).

    python examples/trl_sft.py --tiny                 # offline, seconds: tiny random Llama, four records
    python examples/trl_sft.py --out runs/trl-sft     # smollm2-135m on the built-in E2E training split

Settings, and why:
- `PrefixSFTTrainer` (prefixtune.hf_trainer; needs trl) instead of `SFTTrainer`: TRL computes its loss with a
  fused LM head that it patches into the model's forward; on a PrefixModel that patch would bypass the prefix
  (a plain SFTTrainer fails at the first step), so PrefixSFTTrainer moves it under PrefixModel.forward onto the
  base model. It also writes adapter-only checkpoints (PEFT's files) and resumes them, as PrefixTrainer does.
- No `peft_config=`: TRL would wrap the base model with PEFT's own prefix tuning. The PrefixModel is the model;
  `prefix_config_from_peft(peft.PrefixTuningConfig(...))` converts a PEFT config if you have one.
- The data are prompt/completion pairs ("source\\nOutput:" / " target"): TRL tokenizes them, appends EOS and
  trains on the completion only (`completion_only_loss`, its default for this format); it keeps its own columns,
  so nothing needs `remove_unused_columns=False`.
- `bf16` only on a GPU that has it: TRL turns bf16 autocast on by default, which on a CPU without native bf16
  is slow (and rounds the logits). TRL also turns gradient checkpointing on by default; it works for prefixes.
- `learning_rate=3e-3` with the MLP reparameterization, as in examples/trainer.py.
"""

from __future__ import annotations

import argparse

import torch
from _common import e2e_examples, model_and_tokenizer
from datasets import Dataset
from trl import SFTConfig

import prefixtune
from prefixtune import data
from prefixtune.hf_trainer import PrefixSFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model and data (offline, seconds)")
    parser.add_argument("--out", default="runs/trl-sft-example", help="output_dir (checkpoints, final adapter)")
    parser.add_argument("--max-steps", type=int, default=None, help="default: 30 with --tiny, 200 otherwise")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    args = parser.parse_args()

    base, tokenizer = model_and_tokenizer(args.tiny)
    config = prefixtune.PrefixConfig(num_virtual_tokens=10, init_text="table-to-text: name food area price rating")
    model = prefixtune.attach(base, config, tokenizer=tokenizer)

    examples = e2e_examples(args.tiny)
    pairs = [{"prompt": e.source + data.SEPARATOR, "completion": data.TARGET_PREFIX + e.target} for e in examples]
    training = SFTConfig(
        output_dir=args.out,
        max_steps=args.max_steps or (30 if args.tiny else 200),
        per_device_train_batch_size=4 if args.tiny else 8,
        learning_rate=1e-2 if args.tiny else 3e-3,
        logging_steps=1 if args.tiny else 10,
        save_steps=10 if args.tiny else 100,
        save_total_limit=2,
        max_length=128,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        report_to=[],
        seed=0,
    )
    trainer = PrefixSFTTrainer(
        model=model, args=training, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(f"{args.out}/final")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; adapter in {args.out}/final")

    model.eval()
    ids = tokenizer(pairs[0]["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    output = model.generate(input_ids=ids.to(model.base_model.device), max_new_tokens=24, do_sample=False)
    print(repr(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
