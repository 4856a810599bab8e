"""Counters and histograms in Prometheus' text format (no client library needed for a handful of series)."""

from __future__ import annotations

import threading
from collections import defaultdict

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_HELP = {
    "prefixtune_requests_total": ("counter", "HTTP requests answered, by route and status code"),
    "prefixtune_prompt_tokens_total": ("counter", "Prompt tokens prefilled"),
    "prefixtune_generation_tokens_total": ("counter", "Tokens generated"),
    "prefixtune_adapter_requests_total": ("counter", "Generation requests accepted, by model (adapter) name"),
    "prefixtune_queue_depth": ("gauge", "Requests waiting for a batch slot"),
    "prefixtune_running_requests": ("gauge", "Requests in the running batch"),
    "prefixtune_adapters_loaded": ("gauge", "Adapters being served"),
    "prefixtune_batch_size": ("histogram", "Rows per forward pass, by phase (prefill, decode, score)"),
    "prefixtune_request_seconds": ("histogram", "Time from request to last token"),
}


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


class Metrics:
    """Thread-safe: the model thread and the HTTP handlers both record into it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        # name -> labels -> (bucket counts, sum, count)
        self._histograms: dict[str, dict[tuple[tuple[str, str], ...], tuple[list[int], float, int]]] = defaultdict(dict)
        self._buckets: dict[str, tuple[float, ...]] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] = self._counters[name].get(key, 0.0) + value

    def observe(self, name: str, value: float, buckets: tuple[float, ...], **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._buckets[name] = buckets
            counts, total, n = self._histograms[name].get(key, ([0] * len(buckets), 0.0, 0))
            counts = [c + (value <= b) for c, b in zip(counts, buckets)]
            self._histograms[name][key] = (counts, total + value, n + 1)

    def add_tokens(self, prompt: int = 0, completion: int = 0) -> None:
        if prompt:
            self.inc("prefixtune_prompt_tokens_total", prompt)
        if completion:
            self.inc("prefixtune_generation_tokens_total", completion)

    def observe_batch(self, phase: str, rows: int) -> None:
        self.observe("prefixtune_batch_size", rows, BATCH_BUCKETS, phase=phase)

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: dict[str, float]) -> str:
        """The exposition text; `gauges` are read at scrape time (queue depth, running rows, adapters)."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in _HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "gauge":
                    lines.append(f"{name} {gauges.get(name, 0)}")
                elif kind == "counter":
                    series = self._counters.get(name) or ({} if name.endswith("requests_total") else {(): 0.0})
                    lines += [f"{name}{_labels(k)} {v:g}" for k, v in sorted(series.items())]
                else:
                    for key, (counts, total, n) in sorted(self._histograms.get(name, {}).items()):
                        for bound, c in zip(self._buckets[name], counts):
                            lines.append(f"{name}_bucket{_labels(key + (('le', f'{bound:g}'),))} {c}")
                        lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {n}")
                        lines.append(f"{name}_sum{_labels(key)} {total:g}")
                        lines.append(f"{name}_count{_labels(key)} {n}")
        return "\n".join(lines) + "\n"
