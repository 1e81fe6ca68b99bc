"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand.

Four small types cover what the server reports; a dependency on prometheus_client would buy
nothing more here. Labels are fixed by the server (never taken from client input), so the number
of series stays bounded.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(names, values) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{str(v)}"' for n, v in zip(names, values))
    return "{" + pairs + "}"


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values: dict[tuple, float] = {} if self.label_names else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self.values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read from a callback at scrape time (a gauge, or a counter kept elsewhere)."""

    def __init__(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge"):
        super().__init__(name, help)
        self.read, self.kind = read, kind

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.read())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets=LATENCY_BUCKETS, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.buckets = tuple(buckets) + (math.inf,)
        self.series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, *labels) -> None:
        with self._lock:
            s = self.series.setdefault(labels, [0] * len(self.buckets) + [0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    s[i] += 1
            s[-2] += value
            s[-1] += 1

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self.series.items())
        for key, s in items:
            for bound, count in zip(self.buckets, s):
                names, values = self.label_names + ("le",), key + (_num(bound),)
                lines.append(f"{self.name}_bucket{_labels(names, values)} {count}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(s[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {s[-1]}")
        return lines


class Metrics:
    def __init__(self):
        self.requests = Counter("zaya_requests_total", "HTTP requests by route and status code.", ("route", "status"))
        self.prompt_tokens = Counter("zaya_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("zaya_generation_tokens_total", "Tokens generated (all requests).")
        self.cancelled = Counter("zaya_requests_cancelled_total", "Requests cancelled because the client went away.")
        self.rejected = Counter("zaya_requests_rejected_total", "Requests refused with 429 (queue full).")
        self.rsa_runs = Counter("zaya_rsa_runs_total", "Markovian RSA runs started.")
        self.latency = Histogram("zaya_request_duration_seconds", "Generation request latency, end to end.",
                                 labels=("route",))
        self.ttft = Histogram("zaya_time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels=("route",))
        self.batch_rows = Histogram("zaya_batch_rows", "Rows decoded together per engine step.", BATCH_BUCKETS)
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge") -> None:
        self.gauges.append(Gauge(name, help, read, kind))

    def cache_gauges(self, cache) -> None:
        """The paged KV cache (zaya.engine.PagedCache): pool occupancy and prefix-cache hits."""
        self.gauge("zaya_cache_blocks_total", "KV cache blocks in the pool.", lambda: cache.num_blocks - 1)
        self.gauge("zaya_cache_blocks_used", "KV cache blocks held by running sequences.", cache.blocks_used)
        self.gauge("zaya_cache_blocks_free", "KV cache blocks free or cached for reuse (evictable).",
                   cache.blocks_free)
        self.gauge("zaya_cache_block_size", "Tokens per KV cache block.", lambda: cache.block_size)
        self.gauge("zaya_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache.",
                   lambda: cache.queried_tokens, "counter")
        self.gauge("zaya_prefix_cache_hit_tokens_total", "Prompt tokens taken from the prefix cache.",
                   lambda: cache.hit_tokens, "counter")
        self.gauge("zaya_prefix_cache_hit_rate", "Prefix cache hit tokens / queried tokens since start.",
                   lambda: cache.hit_tokens / max(1, cache.queried_tokens))
        self.gauge("zaya_cache_evictions_total", "Cached blocks evicted to make room.",
                   lambda: cache.stats()["evictions"], "counter")

    def render(self) -> str:
        parts = [self.requests, self.prompt_tokens, self.generation_tokens, self.cancelled, self.rejected,
                 self.rsa_runs, self.latency, self.ttft, self.batch_rows, *self.gauges]
        return "\n".join(line for m in parts for line in m.render()) + "\n"
