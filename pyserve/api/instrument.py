"""Per-request accounting around the engine: timing and token counts for /metrics and the access log.

`InstrumentedEngine` wraps an AsyncEngine; the endpoints use it like the engine itself (every other
attribute is the engine's). Each `generate()` call is timed from the HTTP request's arrival (TTFT,
inter-token latency, end-to-end) and its tokens are added to the `RequestAccount` of the HTTP
request it serves, found through a context variable the app sets per request (tasks started
inside the request, one per choice, inherit it). Leaving the stream early closes the engine's
generator, which aborts the request there, exactly as without the wrapper.
"""
from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from pyserve.api.metrics import ServingMetrics


@dataclass
class RequestAccount:
    """What one HTTP request cost: filled by InstrumentedEngine, read by the access log."""

    arrival: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine_requests: int = 0


current_account: contextvars.ContextVar[RequestAccount | None] = contextvars.ContextVar(
    "pyserve_request_account", default=None
)


class InstrumentedEngine:
    def __init__(self, engine: Any, metrics: ServingMetrics) -> None:
        self._engine = engine
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @property
    def wrapped(self) -> Any:
        return self._engine

    async def generate(self, prompt_ids: Any, params: Any) -> AsyncIterator[Any]:
        account = current_account.get()
        arrival = account.arrival if account is not None else time.perf_counter()
        num_prompt = len(prompt_ids)
        m = self._metrics
        generated = 0
        cached = 0
        outputs_seen = 0
        refused = False  # the engine rejected the request outright (bad input): not a request
        last: float | None = None
        reason = "abort"
        outputs = self._engine.generate(prompt_ids, params)
        try:
            async for out in outputs:
                outputs_seen += 1
                now = time.perf_counter()
                n = len(out.new_token_ids)
                if n:
                    if last is None:
                        m.ttft.observe(now - arrival)
                        if n > 1:
                            m.itl.observe(0.0, n - 1)  # tokens that arrived together
                    else:
                        m.itl.observe((now - last) / n, n)
                    last = now
                    generated += n
                    if account is not None:
                        account.completion_tokens += n
                cached = max(cached, int(getattr(out, "num_cached_tokens", 0) or 0))
                if out.finished:
                    reason = out.finish_reason or "stop"
                yield out
        except Exception:
            refused = outputs_seen == 0
            raise
        finally:
            # Close the engine's stream now (aborting the request if it is unfinished), even while
            # being cancelled: the KV pages must not wait for the garbage collector.
            with anyio.CancelScope(shield=True):
                aclose = getattr(outputs, "aclose", None)
                if aclose is not None:
                    await aclose()
            if not refused:
                m.request_success.inc(finished_reason=reason)
                m.e2e.observe(time.perf_counter() - arrival)
                m.prompt_len.observe(num_prompt)
                m.generation_len.observe(generated)
                m.prefix_cache_queries.inc(num_prompt)
                m.prefix_cache_hits.inc(min(cached, num_prompt))
                if account is not None:
                    account.engine_requests += 1
                    account.prompt_tokens += num_prompt
                    account.cached_tokens += min(cached, num_prompt)
