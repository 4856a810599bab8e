"""Prefix-tuning with `transformers.Trainer`: E2E table-to-text on smollm2-135m (or a tiny random model).

    python examples/trainer.py --tiny                 # offline, seconds: tiny random Llama, four records
    python examples/trainer.py --out runs/trainer     # smollm2-135m on the built-in E2E training split
    python examples/trainer.py --tiny --resume        # continue from the last checkpoint in --out

Settings, and why:
- `PrefixTrainer` (prefixtune.hf_trainer) instead of `Trainer`: a stock Trainer trains a PrefixModel too, but it
  saves any model that is not a `PreTrainedModel` or `peft.PeftModel` as a `model.safetensors` of its whole state
  dict, base included. PrefixTrainer saves each checkpoint as the adapter only (adapter_config.json +
  adapter_model.safetensors, PEFT's prefix-tuning files, which `prefixtune generate/serve --adapter`,
  `PrefixModel.from_pretrained` and `peft.PeftModel.from_pretrained` load) and restores it on resume.
- The data are our prompts (`prefixtune.data.encode`: "source\\nOutput: target<eos>", the prompt masked with -100)
  and `DataCollatorForSeq2Seq`, which pads `labels` with -100 (the language-modeling collator would overwrite
  them). The columns are input_ids/labels, which PrefixModel's forward names, so `remove_unused_columns` stays on.
- `learning_rate=3e-3` with the MLP reparameterization (prefixtune's default PrefixConfig): prefixes train at
  much higher rates than full fine-tuning (the demo's recipe); a direct prefix (`reparameterize=False`) wants
  more still. `--gradient-checkpointing` uses Trainer's own switch; it works for prefixes (PEFT refuses it).
- `save_total_limit=2`: each checkpoint is a few MB of adapter plus the optimizer state of that adapter.
"""

from __future__ import annotations

import argparse

from _common import e2e_examples, model_and_tokenizer
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, TrainingArguments

import prefixtune
from prefixtune import data
from prefixtune.hf_trainer import PrefixTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model and data (offline, seconds)")
    parser.add_argument("--out", default="runs/trainer-example", help="Trainer output_dir (checkpoints, final adapter)")
    parser.add_argument("--max-steps", type=int, default=None, help="default: 30 with --tiny, 200 otherwise")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    base, tokenizer = model_and_tokenizer(args.tiny)
    config = prefixtune.PrefixConfig(num_virtual_tokens=10, init_text="table-to-text: name food area price rating")
    model = prefixtune.attach(base, config, tokenizer=tokenizer)  # the adapter is named "default", as in PEFT
    model.print_trainable_parameters()

    encoded, _ = data.encode(e2e_examples(args.tiny), tokenizer, max_length=128)
    train = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps or (30 if args.tiny else 200),
        per_device_train_batch_size=4 if args.tiny else 8,
        learning_rate=1e-2 if args.tiny else 3e-3,
        warmup_steps=0 if args.tiny else 20,
        logging_steps=1 if args.tiny else 10,
        save_steps=10 if args.tiny else 100,
        save_total_limit=2,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to=[],
        seed=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=data.IGNORE_INDEX)
    trainer = PrefixTrainer(
        model=model, args=training, train_dataset=train, data_collator=collator, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(f"{args.out}/final")  # adapter_config.json + adapter_model.safetensors
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; adapter in {args.out}/final")

    model.eval()
    prompt = encoded[0].input_ids[: encoded[0].prompt_length]
    ids = tokenizer(tokenizer.decode(prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
    output = model.generate(input_ids=ids.to(model.base_model.device), max_new_tokens=24, do_sample=False)
    print(repr(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
