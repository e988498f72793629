"""`GET /metrics`: Prometheus text format (version 0.0.4), vLLM's metric names under `pyserve:`.

Two kinds of numbers:
- Read from `engine.stats()` when scraped: requests running/waiting, KV pages, engine counters.
- Recorded by the app per request (see instrument.py): TTFT, inter-token latency, end-to-end
  latency, prompt/generation lengths, finish reasons, prefix-cache queries/hits, refusals.

Every series carries the `model_name` label, as vLLM's do. No client library: the format is a
few lines of text (`# HELP`, `# TYPE`, then `name{labels} value`).

Updated and rendered on the event loop's thread only, so the numbers are plain Python numbers
with no locks: an observation on the per-token path is a bisect and three additions.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any, Callable, Sequence

PREFIX = "pyserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (vLLM's build_1_2_5_buckets)."""
    out: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_len:
                return tuple(out)
            out.append(float(value))
        exponent += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: dict[str, str]) -> None:
        self.name = PREFIX + name
        self.help = help
        self.base_labels = dict(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonic count; optional one extra label (e.g. finished_reason)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: dict[str, str]) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items())) if labels else ()
        self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0)

    def render(self) -> list[str]:
        items = sorted(self._values.items()) or [((), 0)]
        return self.header() + [f"{self.name}{_labels({**self.base_labels, **dict(k)})} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when scraped (from engine.stats() or an app counter)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: dict[str, str], read: Callable[[], float | None]) -> None:
        super().__init__(name, help, labels)
        self.read = read

    def render(self) -> list[str]:
        value = self.read()
        if value is None:  # the engine does not report it
            return []
        return self.header() + [f"{self.name}{_labels(self.base_labels)} {_number(value)}"]


class ReadCounter(Gauge):
    """A counter kept elsewhere (the engine's), read when scraped."""

    kind = "counter"


class ReadCounterByPosition(_Metric):
    """A list of engine counters, one series per index under a `position` label (vLLM's
    spec_decode_num_accepted_tokens_per_pos); nothing when the engine reports none."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: dict[str, str], read: Callable[[], Sequence[float] | None]) -> None:
        super().__init__(name, help, labels)
        self.read = read

    def render(self) -> list[str]:
        values = self.read()
        if not values:
            return []
        return self.header() + [
            f"{self.name}{_labels({**self.base_labels, 'position': str(i)})} {_number(v)}" for i, v in enumerate(values)
        ]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: dict[str, str], buckets: Sequence[float]) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float, count: int = 1) -> None:
        self._counts[bisect_left(self.buckets, value)] += count  # the first bucket with value <= le
        self._sum += value * count
        self._count += count

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        counts, total, n = self._counts, self._sum, self._count
        lines = self.header()
        cumulative = 0
        for bound, c in zip((*self.buckets, math.inf), counts):
            cumulative += c
            labels = _labels({**self.base_labels, "le": _number(float(bound)) if bound != math.inf else "+Inf"})
            lines.append(f"{self.name}_bucket{labels} {cumulative}")
        lines.append(f"{self.name}_sum{_labels(self.base_labels)} {_number(total)}")
        lines.append(f"{self.name}_count{_labels(self.base_labels)} {n}")
        return lines


class ServingMetrics:
    """Every series /metrics shows. `stats` returns the engine's stats dict (may raise)."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]], max_model_len: int = 8192,
                 pending: Callable[[], int] | None = None) -> None:
        self._stats_fn = stats
        self._stats: dict[str, Any] = {}
        labels = {"model_name": model_name}

        def stat(key: str) -> Callable[[], float | None]:
            return lambda: self._stats.get(key)

        def kv_usage() -> float | None:
            used, total = self._stats.get("kv_pages_used"), self._stats.get("kv_pages_total")
            if used is None or not total:
                return None
            return used / total

        self.gauges: list[_Metric] = [
            Gauge("num_requests_running", "Number of requests in model execution batches.", labels, stat("num_running")),
            Gauge("num_requests_waiting", "Number of requests waiting to be processed.", labels, stat("num_waiting")),
            Gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, kv_usage),
            Gauge("kv_pages_used", "KV-cache pages held by requests (pages only the prefix cache holds are not counted).", labels,
                  stat("kv_pages_used")),
            Gauge("kv_pages_cached", "KV-cache pages held only by the prefix cache (evictable, except pinned prompts').", labels,
                  stat("kv_pages_cached")),
            Gauge("kv_pages_total", "KV-cache pages in the pool.", labels, stat("kv_pages_total")),
            Gauge("num_requests_pending", "Generation requests the HTTP layer has accepted and not yet answered.",
                  labels, (lambda: pending()) if pending is not None else (lambda: None)),
            ReadCounter("prompt_tokens_total", "Number of prefill tokens processed.", labels,
                        stat("prompt_tokens_computed")),
            ReadCounter("generation_tokens_total", "Number of generation tokens processed.", labels,
                        stat("tokens_generated")),
            ReadCounter("num_preemptions_total", "Cumulative number of preemptions from the engine.", labels,
                        stat("preemptions")),
            ReadCounter("engine_steps_total", "Engine steps (forward passes) run.", labels, stat("steps")),
            ReadCounter("spec_decode_num_drafts_total", "Decode steps of one sequence that verified draft tokens.",
                        labels, stat("spec_verifies")),
            ReadCounter("spec_decode_num_draft_tokens_total", "Draft tokens verified.", labels,
                        stat("spec_draft_tokens")),
            ReadCounter("spec_decode_num_accepted_tokens_total", "Draft tokens accepted.", labels,
                        stat("spec_accepted_tokens")),
            ReadCounterByPosition("spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted, by their position in the draft (0: the first).", labels,
                                  stat("spec_accepted_by_position")),
            ReadCounter("structured_output_masks_total",
                        "Allowed-token masks computed for constrained sequences (one per token drawn).", labels,
                        stat("grammar_masks")),
            ReadCounter("structured_output_mask_seconds_total", "Time spent computing allowed-token masks.",
                        labels, stat("grammar_mask_seconds")),
        ]
        self.request_success = Counter(
            "request_success_total", "Count of finished requests, by finish reason (abort: cancelled or client gone).",
            labels)
        self.request_rejected = Counter(
            "request_rejected_total", "Generation requests refused before reaching the engine (overloaded).", labels)
        self.prefix_cache_queries = Counter(
            "prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.", labels)
        self.prefix_cache_hits = Counter(
            "prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", labels)
        self.ttft = Histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels, ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                             labels, E2E_BUCKETS)
        buckets = token_buckets(max(max_model_len, 1))
        self.prompt_len = Histogram("request_prompt_tokens", "Number of prefill tokens processed per request.",
                                    labels, buckets)
        self.generation_len = Histogram("request_generation_tokens",
                                        "Number of generation tokens processed per request.", labels, buckets)

    def render(self) -> bytes:
        try:
            self._stats = dict(self._stats_fn() or {})
        except Exception:  # a stopped engine: the app's own series still render
            self._stats = {}
        lines: list[str] = []
        metrics: list[Any] = [*self.gauges, self.request_success, self.request_rejected, self.prefix_cache_queries,
                              self.prefix_cache_hits, self.ttft, self.itl, self.e2e, self.prompt_len,
                              self.generation_len]
        for metric in metrics:
            lines.extend(metric.render())
        return ("\n".join(lines) + "\n").encode("utf-8")
