"""Generation in the performance suite (bench/perf.py): greedy tokens/s of the bare model, our prefix and PEFT's
prefix, in one worker process (`generate`).

torch, peft and prefixtune are imported inside the function, on purpose: bench/perf.py's main() sets
OMP_WAIT_POLICY before torch is first imported (the workers inherit it), and `python -m bench --help` stays fast.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.perf_common import load_resident_model


def generate_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy tokens/s of the bare model, our prefix and PEFT's prefix, interleaved, at each batch size."""
    import peft
    import torch

    import prefixtune
    from prefixtune import data

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    inputs = torch.load(spec["inputs"], weights_only=True)
    p = spec["virtual_tokens"]
    bare = load_resident_model(spec["model"]).eval()
    ours = prefixtune.attach(
        load_resident_model(spec["model"]), prefixtune.PrefixConfig(num_virtual_tokens=p, init="random")
    )
    ours.eval()
    theirs = peft.get_peft_model(
        load_resident_model(spec["model"]), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)
    ).eval()
    models = {"bare": bare, "ours": ours, "peft": theirs}
    out: dict[str, Any] = {}
    for size in spec["batch_sizes"]:
        prompts = inputs["prompts"][:size]
        _, batch = data.prompt_batches(prompts, size, pad_id=inputs["pad_id"], bucket_by_length=False)[0]
        kwargs = dict(
            **batch,
            max_new_tokens=spec["new_tokens"],
            min_new_tokens=spec["new_tokens"],
            do_sample=False,
            pad_token_id=inputs["pad_id"],
        )
        new_tokens = size * spec["new_tokens"]
        rates: dict[str, list[float]] = {name: [] for name in models}
        cpu_rates: dict[str, list[float]] = {name: [] for name in models}
        order = list(models)
        with torch.no_grad():
            for model in models.values():
                model.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm up
            for r in range(spec["repeats"]):
                for name in order[r % 3 :] + order[: r % 3]:  # rotate who goes first
                    start, cpu_start = time.perf_counter(), time.process_time()
                    models[name].generate(**kwargs)
                    rates[name].append(new_tokens / (time.perf_counter() - start))
                    cpu_rates[name].append(new_tokens / max(time.process_time() - cpu_start, 1e-9))
        out[f"b{size}"] = {name: round(statistics.median(v), 2) for name, v in rates.items()}
        out[f"b{size}_cpu"] = {name: round(statistics.median(v), 2) for name, v in cpu_rates.items()}
        out[f"b{size}_all"] = {name: [round(x, 2) for x in v] for name, v in rates.items()}
    return out
