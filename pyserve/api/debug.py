"""MLC's debug routes, mounted only with --enable-debug (404 otherwise, as in MLC):

  POST /debug/dump_engine_metrics  the engine's counters and gauges as JSON
  POST /debug/reset_engine         ends every request (finish_reason "abort") and empties the
                                   prefix cache, pinned prompts included
  POST /debug/dump_event_trace     the engine's event trace (--enable-tracing) in Chrome's
                                   trace-event format: load it in Perfetto or chrome://tracing

Requests may then carry MLC's `debug_config` ({"ignore_eos": bool, "pinned_system_prompt": bool});
see openai._params."""

from __future__ import annotations

from typing import Any

import anyio

from pyserve.api.asgi import Request, send_json
from pyserve.protocol.errors import ProtocolError

# Chrome trace-event JSON: one process, tid 0 the engine's steps, every other tid one request.
ENGINE_TID = 0


def trace_event_json(events: list[tuple], pid: int = 1) -> dict[str, Any]:
    """[(name, ph, ts_us, dur_us, tid, args)] from the engine -> {"traceEvents": [...]}, with a
    thread name per track; every event has ph, ts, pid, tid and name."""
    out: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": ENGINE_TID, "args": {"name": "pyserve engine"}},
        {"name": "thread_name", "ph": "M", "ts": 0, "pid": pid, "tid": ENGINE_TID, "args": {"name": "engine steps"}},
    ]
    named: set[int] = set()
    for name, ph, ts, dur, tid, args in events:
        if tid != ENGINE_TID and tid not in named:
            named.add(tid)
            out.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": pid, "tid": tid,
                        "args": {"name": f"request {tid}"}})
        event = {"name": name, "ph": ph, "ts": ts, "pid": pid, "tid": tid, "args": dict(args)}
        if ph == "X":
            event["dur"] = dur
        elif ph == "i":
            event["s"] = "t"  # an instant on its own track
        out.append(event)
    return {"traceEvents": out, "displayTimeUnit": "ms"}


class DebugRoutes:
    def __init__(self, engine: Any, metrics: Any) -> None:
        self.engine = engine
        self.metrics = metrics

    def mount(self, router: Any) -> None:
        router.add("POST", "/debug/dump_engine_metrics", self.dump_engine_metrics)
        router.add("POST", "/debug/reset_engine", self.reset_engine)
        router.add("POST", "/debug/dump_event_trace", self.dump_event_trace)

    async def dump_engine_metrics(self, request: Request) -> None:
        stats = dict(self.engine.stats())
        stats["prefix_cache_queries_total"] = self.metrics.prefix_cache_queries.value()
        stats["prefix_cache_hits_total"] = self.metrics.prefix_cache_hits.value()
        await send_json(request, 200, stats)

    async def reset_engine(self, request: Request) -> None:
        self.engine.reset()
        await send_json(request, 200, {"status": "ok"})

    async def dump_event_trace(self, request: Request) -> None:
        if not getattr(self.engine.config, "enable_tracing", False):
            raise ProtocolError("event tracing is off: start the server with --enable-tracing", status=400)
        # Up to 100,000 events copied and converted: off the event loop.
        body = await anyio.to_thread.run_sync(lambda: trace_event_json(self.engine.trace()))
        await send_json(request, 200, body)
