#!/usr/bin/env python3
"""HTTP layer benchmark: pyserve's server + app against uvicorn + FastAPI and a bare anyio + h11
loop (the ceiling), all measured in the same run. Speed is printed, never asserted.

    python tools/bench_http.py [--duration 5] [--connections 32] [--tokens 64] [--token-interval 0]
                               [--servers bare uvicorn+fastapi uvicorn+pyserve pyserve] [--no-itl]

Servers (each its own process, pinned with `taskset -c 0`; the load generator runs on core 1):
  bare            ~30 lines of anyio + h11 on asyncio: no ASGI, no routing, precomputed bodies
  uvicorn+fastapi uvicorn (httptools, uvloop) serving FastAPI routes that build the same JSON
  uvicorn+pyserve uvicorn (httptools, uvloop) serving pyserve's App: the same app, another server
  pyserve         pyserve.http serving pyserve's App, set up as `python -m pyserve` does
                  (access log on at INFO, OpenAI error bodies); logs go to a file
The apps run over a fake engine (tokens at a fixed interval, or as fast as possible), so only the
HTTP and API layers are measured. Bench-only dependencies: `pip install fastapi httptools uvloop`.

Load: `wrk` (apt-get install wrk) when it is on PATH, else a small keep-alive socket client
built in (no pipelining). Measured:
  1. GET /v1/models, `wrk -t1 -c{connections}`: requests/s.
  2. A streamed completion of N tokens (`"stream": true`), wrk -c8, the fake engine's tokens as
     fast as possible (or --token-interval apart): server CPU seconds (from /proc/PID/stat) / SSE
     chunks delivered = CPU per chunk (an upper bound of the HTTP + API cost: it includes the fake
     engine's own few microseconds).
  3. The real engine's decode inter-token latency (ITL) on the default model, batch 1 and 8,
     through pyserve.engine.AsyncEngine (pyserve._C) in its own process, both cores, run alone.
Printed: a table, pyserve / uvicorn+fastapi, pyserve / bare, per-chunk CPU as % of ITL.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

MODEL = "bench-model"
SERVER_CORE, CLIENT_CORE = "0", "1"


# ---- the fake engine (same interface as pyserve.engine.AsyncEngine) ----------------------------


class BenchEngine:
    """Emits `max_tokens` tokens (the letter 'a'), one RequestOutput each, `itl` seconds apart
    (0: as fast as the event loop allows, still yielding between tokens)."""

    def __init__(self, itl: float = 0.0) -> None:
        from api_fakes import FakeModel, FakeModelConfig

        self.model = FakeModel(name=MODEL, path="/models/" + MODEL, config=FakeModelConfig(max_position_embeddings=8192))
        self.max_model_len = 8192
        self.itl = itl
        self._ids = 0

    async def generate(self, prompt_ids: list[int], params: Any):
        import anyio

        from pyserve.engine.sampling import RequestOutput

        self._ids += 1
        n = params.max_tokens or 16
        for i in range(n):
            if self.itl:
                await anyio.sleep(self.itl)
            else:
                await anyio.lowlevel.checkpoint()
            last = i == n - 1
            yield RequestOutput([97], last, "length" if last else None, len(prompt_ids), request_id=self._ids)

    async def run(self, *, task_status: Any = None) -> None:
        import anyio

        if task_status is not None:
            task_status.started()
        await anyio.sleep_forever()

    async def shutdown(self) -> None:
        pass

    def stats(self) -> dict:
        return {"running": 0, "waiting": 0, "kv_capacity_tokens": 1 << 20}


def pyserve_app(itl: float) -> Any:
    from pyserve.api import create_app

    return create_app(BenchEngine(itl), served_model_name=MODEL)


def models_json(app: Any) -> bytes:
    """The exact /v1/models body pyserve's app sends (the bare loop and FastAPI send the same)."""
    from pyserve.api import openai
    from pyserve.protocol import responses as R

    return R.dumps(R.model_list([openai._card(app.ctx)]))


def sse_chunks(tokens: int) -> list[bytes]:
    """SSE events shaped like pyserve's completion chunks."""
    created = int(time.time())
    out = []
    for i in range(tokens):
        last = i == tokens - 1
        obj = {"id": "cmpl-bench", "object": "text_completion", "created": created, "model": MODEL,
               "choices": [{"index": 0, "text": "a", "logprobs": None,
                            "finish_reason": "length" if last else None}]}
        out.append(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


# ---- servers (run as `bench_http.py --serve KIND`) --------------------------------------------


def serve_bare(port: int, tokens: int, itl: float) -> None:
    """The ceiling: anyio + h11 and nothing else (no ASGI, no routing, no logging, no limits)."""
    import anyio
    import h11

    models = models_json(pyserve_app(itl))
    chunks = sse_chunks(tokens)
    json_head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(models))]

    async def handle(stream: Any) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        conn.receive_data(await stream.receive())
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                elif isinstance(event, h11.Request):
                    target = event.target
                elif isinstance(event, h11.EndOfMessage):
                    if target == b"/v1/models":
                        await stream.send(conn.send(h11.Response(status_code=200, headers=json_head))
                                          + conn.send(h11.Data(data=models)) + conn.send(h11.EndOfMessage()))
                    else:
                        await stream.send(conn.send(h11.Response(
                            status_code=200, headers=[(b"content-type", b"text/event-stream")])))
                        for chunk in chunks:
                            await (anyio.sleep(itl) if itl else anyio.lowlevel.checkpoint())
                            await stream.send(conn.send(h11.Data(data=chunk)))
                        await stream.send(conn.send(h11.EndOfMessage()))
                    if conn.our_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                elif not isinstance(event, h11.Data):
                    return  # ConnectionClosed or anything unexpected

    async def main() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        await listener.serve(handle)

    anyio.run(main)


def serve_uvicorn(port: int, app: Any) -> None:
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="info",
                lifespan="on")


def fastapi_app(tokens: int, itl: float) -> Any:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()
    models = json.loads(models_json(pyserve_app(itl)))

    async def list_models() -> JSONResponse:
        return JSONResponse(models)

    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        n = int(body.get("max_tokens") or tokens)
        created = int(time.time())

        async def events():
            for i in range(n):
                await (anyio.sleep(itl) if itl else anyio.lowlevel.checkpoint())
                last = i == n - 1
                obj = {"id": "cmpl-bench", "object": "text_completion", "created": created, "model": MODEL,
                       "choices": [{"index": 0, "text": "a", "logprobs": None,
                                    "finish_reason": "length" if last else None}]}
                yield b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # This module's `from __future__ import annotations` leaves annotations as strings, which
    # FastAPI would resolve in the module's globals: hand it the real classes.
    list_models.__annotations__ = {"return": JSONResponse}
    completions.__annotations__ = {"request": Request, "return": StreamingResponse}
    app.get("/v1/models")(list_models)
    app.post("/v1/completions")(completions)
    return app


def serve_pyserve(port: int, itl: float) -> None:
    from pyserve.cli import setup_logging
    from pyserve.http import ServerConfig, run

    setup_logging("info")  # as `python -m pyserve` does: access log on
    run(pyserve_app(itl), ServerConfig(port=port))


def serve(kind: str, port: int, tokens: int, itl: float) -> None:
    if kind == "bare":
        serve_bare(port, tokens, itl)
    elif kind == "uvicorn+fastapi":
        serve_uvicorn(port, fastapi_app(tokens, itl))
    elif kind == "uvicorn+pyserve":
        serve_uvicorn(port, pyserve_app(itl))
    elif kind == "pyserve":
        serve_pyserve(port, itl)
    else:
        raise SystemExit(f"unknown server kind {kind!r}")


# ---- load generation ----------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(16).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children: none here)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, connections: int, duration: float, lua: str | None = None) -> Load:
    cmd = ["taskset", "-c", CLIENT_CORE, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s"]
    if lua:
        cmd += ["-s", lua]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    secs = float(re.search(r"requests in ([\d.]+)(m?s)", out).group(1))
    if re.search(r"requests in [\d.]+ms", out):
        secs /= 1000
    errors = 0
    for m in re.finditer(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    if m2 := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m2.group(1))
    return Load(reqs, secs, errors)


def run_builtin(port: int, request: bytes, connections: int, duration: float) -> Load:
    """A keep-alive load generator without pipelining (one request in flight per connection), for
    machines without wrk. It runs in a child pinned to the client core."""
    code = f"""
import selectors, socket, time, re
req = {request!r}
sel = selectors.DefaultSelector()
end = time.monotonic() + {duration}
done = errors = 0
for _ in range({connections}):
    s = socket.create_connection(("127.0.0.1", {port})); s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.send(req); sel.register(s, selectors.EVENT_READ, bytearray())
t0 = time.monotonic()
while time.monotonic() < end:
    for key, _ in sel.select(0.5):
        s, buf = key.fileobj, key.data
        chunk = s.recv(262144)
        if not chunk:
            raise SystemExit("server closed a connection")
        buf += chunk
        head_end = buf.find(b"\\r\\n\\r\\n")
        if head_end < 0:
            continue
        head = bytes(buf[:head_end]).lower()
        m = re.search(rb"content-length: *(\\d+)", head)
        if m:
            total = head_end + 4 + int(m.group(1))
            if len(buf) < total:
                continue
        elif not buf.endswith(b"0\\r\\n\\r\\n"):
            continue
        else:
            total = len(buf)
        if not head.startswith(b"http/1.1 200"):
            errors += 1
        done += 1
        del buf[:total]
        s.send(req)
print(done, time.monotonic() - t0, errors)
"""
    out = subprocess.run(["taskset", "-c", CLIENT_CORE, sys.executable, "-c", code],
                         capture_output=True, text=True, check=True).stdout.split()
    return Load(int(out[0]), float(out[1]), int(out[2]))


STREAM_LUA = """
wrk.method = "POST"
wrk.body = '{"model": "%s", "prompt": "Hi", "max_tokens": %d, "stream": true}'
wrk.headers["Content-Type"] = "application/json"
"""


def count_chunks(port: int, tokens: int) -> int:
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": tokens, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.count(b"data: ")


@dataclass
class Result:
    kind: str
    models: Load
    models_cpu: float = 0.0  # server CPU seconds during the GET /v1/models run
    stream: Load | None = None
    chunks_per_stream: int = 0
    stream_cpu: float = 0.0

    @property
    def cpu_per_request(self) -> float:
        return self.models_cpu / self.models.requests if self.models.requests else float("nan")

    @property
    def cpu_per_chunk(self) -> float:
        if not self.stream or not self.stream.requests:
            return float("nan")
        return self.stream_cpu / (self.stream.requests * self.chunks_per_stream)


class Median:
    """The median of each number over the rounds of one server."""

    def __init__(self, rounds: list[Result]) -> None:
        self.rounds = rounds
        self.models_rps = statistics.median(r.models.rps for r in rounds)
        self.stream_rps = statistics.median(r.stream.rps for r in rounds if r.stream)
        self.cpu_per_request = statistics.median(r.cpu_per_request for r in rounds)
        self.cpu_per_chunk = statistics.median(r.cpu_per_chunk for r in rounds)


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def bench_server(kind: str, args: argparse.Namespace, tmp: str) -> Result:
    port = free_port()
    log = open(os.path.join(tmp, f"{kind}.log"), "w")
    proc = subprocess.Popen(["taskset", "-c", SERVER_CORE, sys.executable, os.path.abspath(__file__), "--serve", kind,
                             "--port", str(port), "--tokens", str(args.tokens),
                             "--token-interval", str(args.token_interval)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc)
        url = f"http://127.0.0.1:{port}/v1/models"
        get = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        if args.wrk:
            run_wrk(url, args.connections, 1)  # warm-up
            before = cpu_seconds(proc.pid)
            models = run_wrk(url, args.connections, args.duration)
        else:
            run_builtin(port, get, args.connections, 1)
            before = cpu_seconds(proc.pid)
            models = run_builtin(port, get, args.connections, args.duration)
        result = Result(kind, models, cpu_seconds(proc.pid) - before)
        result.chunks_per_stream = count_chunks(port, args.tokens)
        lua = os.path.join(tmp, "stream.lua")
        with open(lua, "w") as f:
            f.write(STREAM_LUA % (MODEL, args.tokens))
        before = cpu_seconds(proc.pid)
        surl = f"http://127.0.0.1:{port}/v1/completions"
        if args.wrk:
            result.stream = run_wrk(surl, args.stream_connections, args.duration, lua)
        else:
            body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": args.tokens, "stream": True}).encode()
            req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
            result.stream = run_builtin(port, req, args.stream_connections, args.duration)
        result.stream_cpu = cpu_seconds(proc.pid) - before
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ---- the real engine's inter-token latency -------------------------------------------------------


def measure_itl(tokens: int) -> dict[int, float]:
    """Median decode ITL (seconds) of the default model at batch 1 and 8, through AsyncEngine."""
    import anyio

    from pyserve.config import EngineConfig
    from pyserve.engine.async_engine import AsyncEngine
    from pyserve.engine.sampling import SamplingParams
    from pyserve.model.loader import default_model_path, load_model

    engine = AsyncEngine(load_model(default_model_path()), EngineConfig(num_threads=2, max_num_sequence=8))
    prompt = engine.model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    out: dict[int, float] = {}

    async def one(gaps: list[float], seed: int) -> None:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, seed=seed)
        last = None
        async for o in engine.generate(prompt, params):
            now = time.perf_counter()
            if last is not None and o.new_token_ids:
                gaps.append((now - last) / len(o.new_token_ids))
            if o.new_token_ids:
                last = now

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            for batch in (1, 8):
                gaps: list[float] = []
                async with anyio.create_task_group() as inner:
                    for i in range(batch):
                        inner.start_soon(one, gaps, i)
                out[batch] = statistics.median(gaps)
            await engine.shutdown()
            tg.cancel_scope.cancel()

    anyio.run(main)
    return out


# ---- report ---------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per load run (default 4)")
    p.add_argument("--connections", type=int, default=32, help="connections for GET /v1/models (default 32)")
    p.add_argument("--stream-connections", type=int, default=8, help="connections for streaming (default 8)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per streamed completion (default 64)")
    p.add_argument("--servers", nargs="+", default=["bare", "uvicorn+fastapi", "uvicorn+pyserve", "pyserve"])
    p.add_argument("--token-interval", type=float, default=0.0,
                   help="seconds between the fake engine's tokens (default 0: as fast as possible)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all servers; medians are reported (default 3)")
    p.add_argument("--no-itl", action="store_true", help="skip the real engine's ITL measurement")
    p.add_argument("--builtin-client", action="store_true", help="use the built-in client even if wrk exists")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.tokens, args.token_interval)
        return
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin server and client to separate cores")
    args.wrk = shutil.which("wrk") is not None and not args.builtin_client
    print(f"load generator: {'wrk' if args.wrk else 'built-in keep-alive client'}; server pinned to core "
          f"{SERVER_CORE}, client to core {CLIENT_CORE}; {args.duration:.0f} s per run, {args.rounds} round(s) "
          f"of every server (medians reported); load average before: {_loadavg()}")
    rounds: dict[str, list[Result]] = {kind: [] for kind in args.servers}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            for kind in args.servers:
                r = bench_server(kind, args, tmp)
                rounds[kind].append(r)
                print(f"  round {n + 1} {kind:16s} GET /v1/models {r.models.rps:8.0f} req/s, "
                      f"{r.cpu_per_request * 1e6:6.1f} us CPU/req (errors {r.models.errors});  "
                      f"stream {r.stream.rps:6.1f} req/s, {r.cpu_per_chunk * 1e6:6.1f} us CPU/chunk "  # type: ignore[union-attr]
                      f"(errors {r.stream.errors})", flush=True)  # type: ignore[union-attr]
    results = {kind: Median(rs) for kind, rs in rounds.items()}
    print(f"load average after: {_loadavg()} (other work on the machine shows up as noise)")
    itl = None if args.no_itl else measure_itl(32)

    print()
    print(f"| server | GET /v1/models req/s | server CPU us/req | stream req/s ({args.tokens} tok) | server CPU us/chunk |")
    print("|---|---|---|---|---|")
    for kind, m in results.items():
        print(f"| {kind} | {m.models_rps:.0f} | {m.cpu_per_request * 1e6:.1f} | {m.stream_rps:.1f} | "
              f"{m.cpu_per_chunk * 1e6:.1f} |")
    print()
    ps = results.get("pyserve")
    if ps is not None:
        for peer in ("uvicorn+fastapi", "uvicorn+pyserve", "bare"):
            if peer in results:
                q = results[peer]
                print(f"pyserve / {peer:16s} GET /v1/models {ps.models_rps / q.models_rps:5.2f}x "
                      f"(server CPU per request {ps.cpu_per_request / q.cpu_per_request:5.2f}x)   "
                      f"stream CPU/chunk {ps.cpu_per_chunk / q.cpu_per_chunk:5.2f}x")
        if itl:
            for batch, gap in itl.items():
                over = ps.cpu_per_chunk * batch / gap
                print(f"real engine decode ITL, batch {batch}: {gap * 1e3:.1f} ms; pyserve's per-chunk CPU "
                      f"({ps.cpu_per_chunk * 1e6:.1f} us) x {batch} chunk(s) per step = {over * 100:.2f}% of it")


if __name__ == "__main__":
    main()
