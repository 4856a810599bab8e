"""`prefixtune` command line: one subcommand per job. User errors print one line and exit 2 (Ctrl-C: 130)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from .errors import PrefixTuneError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _add_train(sub: Any) -> None:
    from .config import TrainConfig, field_help

    helps = field_help(TrainConfig)
    p = sub.add_parser(
        "train",
        help="train a prefix (or another method) on a data set",
        description="Train a method on a data set. Settings come from defaults, then --config FILE.yaml, then "
        "flags, then key=value overrides (any field below, or a method option such as init_text=...).",
        epilog="All settings (use as key=value):\n"
        + "\n".join(f"  {f.name:<20} {helps[f.name]} (default: {_default(f)})" for f in fields(TrainConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help=helps["model"])
    p.add_argument(
        "--data",
        action="append",
        metavar="[TASK=]DATA",
        help="built-in set (e2e, xsum, multiemo), .jsonl/.csv or hf:NAME; repeat as TASK=DATA to train one prefix "
        "per task in one run (saved in OUT/TASK/); a file whose records carry `task` does the same",
    )
    p.add_argument("--out", help=helps["out"])
    p.add_argument("--method", help=helps["method"] + " (prefix, prompt, lora, adapter, lora+prefix, full)")
    p.add_argument("--task", choices=["generate", "classify"], help=helps["task"])
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings")
    p.add_argument("--max-steps", type=int, help=helps["max_steps"])
    p.add_argument("--epochs", type=float, help=helps["epochs"])
    p.add_argument("--batch-size", type=int, help=helps["batch_size"])
    p.add_argument("--lr", type=float, help=helps["lr"])
    p.add_argument("--num-virtual-tokens", type=int, help="prefix/prompt length P (a method option)")
    p.add_argument("--top-layers", type=int, metavar="K", help="--method full: train only the top K layers and head")
    p.add_argument("--seed", type=int, help=helps["seed"])
    p.add_argument("--save-every", type=int, help=helps["save_every"])
    p.add_argument("--eval-every", type=int, help=helps["eval_every"])
    p.add_argument("--on-nonfinite", choices=["stop", "skip"], help=helps["on_nonfinite"])
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help=helps["gradient_checkpointing"])
    p.add_argument("--data-dir", help=helps["data_dir"])
    p.add_argument("--source-field", help=helps["source_field"])
    p.add_argument("--target-field", help=helps["target_field"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any setting, e.g. warmup_steps=50")


def _default(f: Any) -> Any:
    return f.default if f.default is not f.default_factory else "{}"  # type: ignore[comparison-overlap]


def _run_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, build_config
    from .methods.registry import option_names
    from .train import train

    values = {
        k: getattr(args, k)
        for k in (
            "model",
            "data",
            "out",
            "method",
            "task",
            "max_steps",
            "epochs",
            "batch_size",
            "lr",
            "seed",
            "save_every",
            "eval_every",
            "on_nonfinite",
            "gradient_checkpointing",
            "data_dir",
            "source_field",
            "target_field",
        )
    }
    overrides = list(args.overrides)
    if args.num_virtual_tokens is not None:
        overrides.append(f"num_virtual_tokens={args.num_virtual_tokens}")
    if args.top_layers is not None:
        overrides.append(f"top_layers={args.top_layers}")
    cfg = build_config(TrainConfig, args.config, values, overrides, option_names)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    summary = {
        "out": str(result.out),
        "steps": result.steps,
        "best_val_loss": result.best_val_loss,
        "stopped_early": result.stopped_early,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "train_seconds": round(result.train_seconds, 2),
    }
    if result.skipped_steps:
        summary["skipped_steps"] = result.skipped_steps
    if result.tasks is not None:
        summary["tasks"] = result.tasks
    if _rank() == 0:  # under torchrun / accelerate launch every process returns here; one summary is enough
        print(json.dumps(summary))
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="score a model (untuned without --adapter) on a data set; prints JSON")
    p.add_argument("--model", required=True, help="built-in alias, HF id, local dir or .gguf file")
    p.add_argument("--adapter", help="directory of a trained method (prefix, LoRA, ...); omit for the untuned model")
    p.add_argument("--data", required=True, help="built-in set, .jsonl/.csv file or hf:NAME")
    p.add_argument("--split", help="train, validation or test (default: test for built-ins, the whole file otherwise)")
    p.add_argument(
        "--metrics",
        help="comma-separated: bleu, rouge, accuracy, perplexity (default bleu,rouge); encoder classifiers: "
        "accuracy, macro_f1, loss (default accuracy,macro_f1)",
    )
    p.add_argument(
        "--task",
        choices=["generate", "classify"],
        help="classify scores labels (default: classify for multiemo, encoder models and classifier adapters)",
    )
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=8, help="examples per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit")
    p.add_argument("--max-length", type=int, default=256, help="max prompt (+target) tokens")
    p.add_argument("--num-beams", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--chat-template", action="store_true", help="wrap sources in the tokenizer's chat template")
    p.add_argument("--data-dir", help="where built-in data files are looked up first")
    p.add_argument("--source-field", help="record field holding the input")
    p.add_argument("--target-field", help="record field holding the target")
    p.add_argument("--predictions", metavar="FILE.jsonl", help="also write each prediction with its references")
    p.add_argument("--force", action="store_true", help="load an adapter trained on another model with same shapes")


def _load(
    model_name: str, adapter: str | None, force: bool = False, labels: list[str] | None = None
) -> tuple[Any, Any]:
    """The model (with its adapter). Classifier adapters bring their labels: an encoder loads with one output each;
    without an adapter, `labels` (the eval data's) give an encoder its untrained head."""
    from .eval import saved_labels
    from .sources import load_model

    if adapter is not None:
        labels = saved_labels([adapter]) or labels
    base, tokenizer = load_model(model_name, labels=labels)
    if adapter is None:
        return base, tokenizer
    from .methods.registry import detect_method, load_trained

    if force and detect_method(adapter) == "prefix":
        from .model import load_adapter

        return load_adapter(base, adapter, force=True), tokenizer
    return load_trained(base, adapter), tokenizer


def _run_eval(args: argparse.Namespace) -> int:
    from . import data
    from .eval import evaluate

    split = args.split
    if split is None and args.data in ("e2e", "xsum", "multiemo"):
        split = "test"
    examples = data.load_dataset(
        args.data, split=split, data_dir=args.data_dir, source_field=args.source_field, target_field=args.target_field
    )[: args.limit]
    from .eval import classify

    task = args.task or (
        "classify" if args.data == "multiemo" or classify.wants_classify(args.model, args.adapter) else "generate"
    )
    labels = sorted({str(classify.example_label(e)) for e in examples}) if task == "classify" else None
    if task == "classify" and not args.adapter:
        import torch

        torch.manual_seed(0)  # an encoder's untrained head: the one a seed-0 training run starts from
    model, tokenizer = _load(args.model, args.adapter, args.force, labels)
    default = "accuracy,macro_f1" if classify.is_sequence_classifier(model) else "bleu,rouge"
    names = [m.strip() for m in (args.metrics or default).split(",") if m.strip()]
    scores, predictions = evaluate(
        model,
        tokenizer,
        examples,
        metric_names=names,
        task=task,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        num_beams=args.num_beams,
        progress=sys.stderr.isatty(),
    )
    if args.predictions:
        from .artifact import atomic_write_bytes

        lines = [
            json.dumps({"source": e.source, "prediction": p, "references": e.references or [e.target]})
            for e, p in zip(examples, predictions)
        ]
        atomic_write_bytes(args.predictions, ("\n".join(lines) + "\n").encode())
    print(json.dumps({"model": args.model, "adapter": args.adapter, "data": args.data, "split": split, **scores}))
    return 0


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, a file or stdin")
    p.add_argument("--model", required=True, help="built-in alias, HF id, local dir or .gguf file")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a trained prefix; repeat to load several (lines of --input-file may pick one: NAME<TAB>text)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt (tokens stream to the terminal)")
    src.add_argument("--input-file", help="one prompt per line ('-' = stdin); 'NAME<TAB>prompt' picks an adapter")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit")
    p.add_argument("--num-beams", type=int, default=1, help="beam width (1 = greedy)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch for files")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--raw", action="store_true", help="use prompts as they are (no 'Output:' format)")


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from .eval import is_sequence_classifier, predict, saved_labels
    from .model import BASE, load_adapter
    from .sources import load_model

    if args.prompt is None and args.input_file is None:
        args.input_file = "-"
    paths = [spec.partition("=")[2] or spec for spec in args.adapter]
    base, tokenizer = load_model(args.model, labels=saved_labels(paths))  # classifier adapters: their labels
    model: Any = base
    names: list[str] = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = None, spec  # type: ignore[assignment]
        model = load_adapter(model, path, name=name)
        names.append(model.adapter_names[-1])
    torch.manual_seed(args.seed)
    classifier = is_sequence_classifier(model)  # an encoder classifier prints each input's predicted label
    if args.prompt is not None and classifier:
        print(predict(model, tokenizer, [args.prompt])[0][0])
        return 0
    if args.prompt is not None:
        return _stream_one(model, tokenizer, args, args.prompt)
    lines = sys.stdin.read().splitlines() if args.input_file == "-" else _read_lines(args.input_file)
    prompts, chosen = [], []
    for number, line in enumerate(lines, 1):
        name, tab, text = line.partition("\t")
        if tab and names:
            if name not in names and name != BASE:
                raise PrefixTuneError(f"line {number}: adapter {name!r} was not loaded (loaded: {names})")
            chosen.append(name)
            prompts.append(text)
        else:
            chosen.append(names[0] if names else BASE)
            prompts.append(line)
    from .eval import generate_texts

    if classifier:
        outputs, _ = predict(
            model, tokenizer, prompts, adapter_names=chosen if names else None, batch_size=args.batch_size
        )
    else:
        outputs = generate_texts(
            model,
            tokenizer,
            prompts,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            chat_template=args.chat_template,
            num_beams=args.num_beams,
            do_sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
            adapter_names=chosen if names else None,
            first_line=False,
        )
    for text in outputs:
        print(text.replace("\n", " "))
    return 0


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise PrefixTuneError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PrefixTuneError(f"{path} is not UTF-8 text") from None


def _stream_one(model: Any, tokenizer: Any, args: argparse.Namespace, prompt: str) -> int:
    import torch
    from transformers import TextStreamer

    from . import data

    if args.raw:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = torch.tensor(data.encode_prompts([prompt], tokenizer, chat_template=args.chat_template)[0])
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs: dict[str, Any] = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        do_sample=args.sample,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if args.num_beams > 1:
        kwargs.pop("streamer")  # transformers streams greedy and sampled decoding only
    if args.sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    out = model.generate(**kwargs)
    if args.num_beams > 1:
        print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


def _add_models(sub: Any) -> None:
    p = sub.add_parser("models", help="list built-in model aliases and what is cached")
    p.add_argument("--prepare", metavar="ALIAS", help="download and convert a built-in model now")


def _run_models(args: argparse.Namespace) -> int:
    from . import sources

    if args.prepare:
        sources.prepare_alias(args.prepare)
    for row in sources.list_models():
        print(json.dumps(row))
    return 0


def _add_data(sub: Any) -> None:
    p = sub.add_parser("data", help="list built-in data sets; --prepare fetches one into the cache")
    p.add_argument("--prepare", metavar="NAME", help="fetch a built-in set (e2e, xsum, multiemo) now")
    p.add_argument("--data-dir", help="where built-in data files are looked up first")


def _run_data(args: argparse.Namespace) -> int:
    from . import sources

    if args.prepare:
        sources.prepare_dataset(args.prepare, args.data_dir)
    for row in sources.list_datasets(args.data_dir):
        print(json.dumps(row, default=str))
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="train and evaluate a prefix on E2E with smollm2-135m (README command 1)")
    p.add_argument("--out", default="runs/demo", help="report directory")
    p.add_argument("--max-steps", type=int, default=80, help="training steps")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N held-out inputs")
    p.add_argument("--model", default="smollm2-135m", help="model to tune")
    p.add_argument("--data-dir", help="where e2e_nlg.json is looked up first")
    p.add_argument("--fresh", action="store_true", help="delete a previous demo run in --out first")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        args.out,
        model=args.model,
        max_steps=args.max_steps,
        eval_limit=args.eval_limit,
        data_dir=args.data_dir,
        fresh=args.fresh,
    )
    return 0


def _add_compare(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="train and score several methods with the same data, budget and evaluation; writes a report",
        description="Each method (and each train size and seed) trains in its own process with the same steps and "
        "batch at its own default learning rate (docs/methods.md), then is scored on the same held-out inputs. "
        "Repeating the command resumes: finished runs are reused, an interrupted one continues from its "
        "checkpoint. Method options go to one method as METHOD.OPTION=VALUE (prefix.num_virtual_tokens=10, "
        "lora.r=8, prefix.lr=5e-3); training settings (warmup_steps=50, ...) are shared.",
    )
    p.add_argument("--methods", required=True, help="comma-separated: prefix,prompt,lora,adapter,lora+prefix,full")
    p.add_argument("--model", default="smollm2-135m", help="built-in alias, HF id, local dir or .gguf file")
    p.add_argument("--data", default="e2e", help="built-in set (e2e, xsum, multiemo), .jsonl/.csv or hf:NAME")
    p.add_argument("--out", required=True, help="comparison directory (runs, report.md/html, plots, results.json)")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps per run (the same for every method)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (the same for every method)")
    p.add_argument("--lr", type=float, help="one learning rate for every method (default: each method's own)")
    p.add_argument("--train-sizes", help="low-data mode: e.g. 50,100,200,500 (or 'all'): one run per size and seed")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1")
    p.add_argument("--eval-split", default="test", choices=["train", "validation", "test", "all"], help="scored split")
    p.add_argument("--eval-limit", type=int, help="score only the first N inputs of the split")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit when scoring")
    p.add_argument("--num-beams", type=int, default=1, help="beam width when scoring (1 = greedy)")
    p.add_argument("--untuned", action="store_true", help="also score the model without training")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="shared settings and METHOD.OPTION=VALUE")


def _run_compare(args: argparse.Namespace) -> int:
    from .compare import CompareSettings, parse_methods, parse_seeds, parse_sizes, run_compare
    from .report import main_table, markdown

    for flag in ("max_steps", "batch_size", "eval_limit", "max_new_tokens", "num_beams", "lr"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise PrefixTuneError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    settings = CompareSettings(
        methods=parse_methods(args.methods),
        model=args.model,
        data=args.data,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        train_sizes=parse_sizes(args.train_sizes) if args.train_sizes else [None],
        seeds=parse_seeds(args.seeds),
        lr=args.lr,
        eval_split=args.eval_split,
        eval_limit=args.eval_limit,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        untuned=args.untuned,
        overrides=list(args.overrides),
    )
    results = run_compare(settings, args.out, progress=not args.quiet)
    print(markdown(*main_table(results["runs"])))
    print(f"\nreport in {args.out}: {', '.join(results['files'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixtune", description="Prefix-tuning for Hugging Face transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_generate, _add_models, _add_data, _add_demo, _add_compare):
        add(sub)
    try:
        from .serve import add_serve_arguments
    except ImportError:
        pass
    else:
        add_serve_arguments(sub.add_parser("serve", help="serve many prefixes over an OpenAI-compatible HTTP API"))
    return parser


RUNNERS = {
    "train": _run_train,
    "eval": _run_eval,
    "generate": _run_generate,
    "models": _run_models,
    "data": _run_data,
    "demo": _run_demo,
    "compare": _run_compare,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere among the flags (argparse only takes them in one run)
    if args.command in ("train", "compare") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening
    try:
        if args.command == "serve":
            from .serve import run_serve

            return run_serve(args)
        return RUNNERS[args.command](args)
    except PrefixTuneError as e:
        if _rank() == 0:  # several processes raise the same error together (distributed.py): say it once
            print(f"prefixtune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prefixtune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if type(e).__name__ == "Interrupted":  # train.Interrupted: a checkpoint was saved
            print(f"prefixtune: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise


if __name__ == "__main__":
    sys.exit(main())
