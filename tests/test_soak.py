"""Soak: a few hundred mixed requests against the real server process, then memory must be back.

The server (`python -m pyserve --mode server --max-num-sequence 8`, default model) is started as a
subprocess so that its RSS (VmRSS of that one process) is the thing measured. A warm-up of every
request kind, including a wave of 8 long echo+logprobs prompts at once (the heaviest KV and logits
use the soak can reach), fills caches, workspaces and allocator pools; RSS is recorded once the
engine is idle. Then a seeded mix of >= 200 requests runs at concurrency 8:

- ~700-word prompts (~5 KB bodies) with echo + logprobs 5 + max_tokens 4 on /v1/completions
- chat with n = 3; completions with stop strings
- streamed completions and chats read to `data: [DONE]`
- clients that hang up right after sending a long prompt (mid-prefill) and after 1-2 SSE events
  (mid-stream)
- bad parameters and malformed JSON, which must get a 4xx with an OpenAI error body

Every well-formed request must get a 200 and a complete answer; nothing may get a 408 or a 5xx.
Afterwards, once /metrics says the engine is idle: no KV page is held by a request, and RSS is at
most 10% above its post-warm-up value. The numbers are printed (`pytest -s` shows them).

Why the warm-up must reach the soak's peak: buffers that grow to the largest batch seen and stay
there (KV pages are reused last-freed-first, so only the peak number in use is ever touched) are
bounded, not leaks, and belong in the baseline. The flip side: such a high-water buffer is only
caught here if the warm-up does not reach it. Engine::logits_ before 43e9c07 ([512 rows x 49152
vocab] floats, 96 MiB, for one echo+logprobs chunk) is the example: with long echo prompts left out
of the warm-up, this test fails on that engine (RSS 890.7 -> 987.3 MiB) and passes on its fix.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from live_server import Reader, busy_pages, connect, hang_up, is_idle, metrics, request, sse_events, wait_until
from server_process import free_port, stop_gracefully, wait_until_healthy

SEED = 20240611
CONCURRENCY = 8
WARMUP_ROUNDS = 2  # each round: one request of every kind (after the wave of long prompts)
SOAK_REQUESTS = 240
RSS_SLACK = 1.10
LONG_PROMPT_WORDS = 700
REQUEST_TIMEOUT = 120.0  # per socket operation: a hung server fails the test, it doesn't stall CI
IDLE_TIMEOUT = 60.0

WORDS = (
    "the of and to in is was for that with as on by at from his her they this which be are an "
    "or had not but have were one all their there been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since "
    "against go came right used take three lighthouse harbor river mountain winter garden engine "
    "letter window morning village station orchard silver candle thunder meadow bridge lantern "
    "keeper shoreline evening distant weather northern shipwreck passage beacon channel granite "
    "wanderer harvest whisper blanket kitchen traveller autumn journey mirror curtain library "
    "chapter captain fisherman horizon compass mountainside afternoon forgotten beautiful "
    "remembered carefully suddenly together something everything quietly nothing"
).split()


# --- the server process -------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def rss_kb(self) -> int:
        """VmRSS of the server process alone, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used (what the soak costs, whatever
        else the machine is doing)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def server_process(log: Path, *args: str) -> Iterator[Server]:
    """Like server_process.running_server, but keeps the Popen (we need its pid for RSS) and sends
    the server's log to a file (a soak's access log is long; its tail goes into failure messages)."""
    port = free_port()
    cmd = [sys.executable, "-m", "pyserve", *args, "--port", str(port),
           "--num-threads", os.environ.get("PYSERVE_TEST_THREADS", "2")]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file)
        try:
            url = wait_until_healthy(proc, port, 180.0, what=" ".join(cmd))
            yield Server(proc, url, log)
        finally:
            stop_gracefully(proc)


# --- requests -----------------------------------------------------------------------------------


@dataclass
class Job:
    kind: str
    path: str
    body: Any  # a dict (sent as JSON) or raw bytes (malformed on purpose)
    expect: int  # the status a correct server answers with (disconnects: 200 if a head is read)
    check: Callable[[dict[str, Any], Any], str | None] | None = None  # the answer complete? (problem or None)
    param: str | None = None  # bad requests: the error's `param` (the field at fault; None: none)
    events_before_hang_up: int = 0  # disconnect_stream: SSE events read before closing
    keep_alive: bool = False  # no `Connection: close` (the server keeps the connection open after)
    split_body: bool = False  # head and body in two writes, as most HTTP clients send them


@dataclass
class Result:
    kind: str
    status: int | None  # None: we hung up before any response (mid-prefill disconnect)
    problem: str | None
    t0: float
    t1: float
    detail: str = ""


def long_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(LONG_PROMPT_WORDS))


def short_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))


def is_error_body(body: Any) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return (isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
            and isinstance(err["message"], str) and bool(err["message"]) and isinstance(err["type"], str))


def check_echo(sent: dict[str, Any], resp: Any) -> str | None:
    (choice,) = resp["choices"]
    if not choice["text"].startswith(sent["prompt"]):
        return "echo: text does not start with the prompt"
    lp = choice["logprobs"]
    n_tokens = resp["usage"]["prompt_tokens"] + resp["usage"]["completion_tokens"]
    if not (len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_tokens):
        return f"echo logprobs: {len(lp['tokens'])} tokens for {n_tokens} in usage"
    if resp["usage"]["prompt_tokens"] < 500 or not 1 <= resp["usage"]["completion_tokens"] <= sent["max_tokens"]:
        return f"echo usage {resp['usage']}"
    if lp["token_logprobs"][0] is not None or any(x is None or x > 0 for x in lp["token_logprobs"][1:]):
        return "echo logprobs: first must be null, the rest <= 0"
    if any(not 1 <= len(top) <= 6 for top in lp["top_logprobs"][1:]):
        return "echo top_logprobs: not 5 (+ the chosen one) per position"
    return check_finish(choice)


def check_finish(choice: dict[str, Any]) -> str | None:
    return None if choice.get("finish_reason") in ("stop", "length") else f"finish_reason {choice.get('finish_reason')}"


def check_chat_n(sent: dict[str, Any], resp: Any) -> str | None:
    choices = resp["choices"]
    if sorted(c["index"] for c in choices) != list(range(sent["n"])):
        return f"chat n={sent['n']}: indexes {[c['index'] for c in choices]}"
    for c in choices:
        if c["message"]["role"] != "assistant" or not isinstance(c["message"]["content"], str):
            return f"chat message {c['message']}"
        if problem := check_finish(c):
            return problem
    if resp["usage"]["completion_tokens"] > sent["n"] * sent["max_tokens"]:
        return f"chat usage {resp['usage']}"
    return None


def check_stop(sent: dict[str, Any], resp: Any) -> str | None:
    (choice,) = resp["choices"]
    if choice["finish_reason"] == "stop" and any(s in choice["text"] for s in sent["stop"]):
        return f"stop string left in the text: {choice['text']!r}"
    return check_finish(choice)


def check_stream(sent: dict[str, Any], events: Any) -> str | None:
    if not events or events[-1] != "[DONE]":
        return "stream did not end with [DONE]"
    chunks = events[:-1]
    if any(not isinstance(e, dict) or "error" in e for e in chunks):
        return f"stream carried an error or a non-JSON event: {chunks[-1:]}"
    finishes = collections.Counter(c["index"] for e in chunks for c in e["choices"] if c.get("finish_reason"))
    if sorted(finishes) != list(range(sent.get("n", 1))) or any(v != 1 for v in finishes.values()):
        return f"stream finish_reason per choice: {dict(finishes)}"
    if sent.get("stream_options", {}).get("include_usage"):
        last = chunks[-1]
        if last["choices"] != [] or "usage" not in last:
            return "stream: no final usage chunk"
    return None


def plan_one(kind: str, rng: random.Random) -> Job:
    job = _plan_body(kind, rng)
    job.keep_alive, job.split_body = rng.random() < 0.5, rng.random() < 0.5
    return job


def _plan_body(kind: str, rng: random.Random) -> Job:
    seed = rng.randrange(1 << 30)
    if kind == "echo_logprobs":
        body = {"prompt": long_prompt(rng), "echo": True, "logprobs": 5, "max_tokens": 4, "temperature": 0}
        return Job(kind, "/v1/completions", body, 200, check_echo)
    if kind == "chat_n3":
        body = {"messages": [{"role": "user", "content": short_prompt(rng)}], "n": 3, "max_tokens": 8,
                "temperature": 0.8, "seed": seed}
        return Job(kind, "/v1/chat/completions", body, 200, check_chat_n)
    if kind == "stop":
        body = {"prompt": short_prompt(rng), "max_tokens": 16, "stop": rng.choice([[" the"], [".", "\n"], ["a", "e"]]),
                "temperature": 0.7, "seed": seed}
        return Job(kind, "/v1/completions", body, 200, check_stop)
    if kind == "stream_completion":
        body = {"prompt": short_prompt(rng), "max_tokens": 12, "stream": True, "temperature": 0.7, "seed": seed,
                "stream_options": {"include_usage": True}}
        return Job(kind, "/v1/completions", body, 200, check_stream)
    if kind == "stream_chat":
        body = {"messages": [{"role": "user", "content": short_prompt(rng)}], "max_tokens": 10, "stream": True,
                "n": rng.choice([1, 2]), "temperature": 0.7, "seed": seed}
        return Job(kind, "/v1/chat/completions", body, 200, check_stream)
    if kind == "disconnect_prefill":
        body = {"prompt": long_prompt(rng), "max_tokens": 8, "temperature": 0, "stream": rng.random() < 0.5}
        return Job(kind, "/v1/completions", body, 200)
    if kind == "disconnect_stream":
        body = {"messages": [{"role": "user", "content": short_prompt(rng)}], "max_tokens": 400, "ignore_eos": True,
                "stream": True, "temperature": 0.7, "seed": seed}
        return Job(kind, "/v1/chat/completions", body, 200, events_before_hang_up=rng.choice([1, 2]))
    if kind == "bad":
        return rng.choice(BAD)(rng)
    raise ValueError(kind)


BAD: list[Callable[[random.Random], Job]] = [
    lambda rng: Job("bad", "/v1/completions", {"prompt": short_prompt(rng), "temperature": -1}, 400,
                    param="temperature"),
    lambda rng: Job("bad", "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": short_prompt(rng)}], "top_p": 0}, 400, param="top_p"),
    lambda rng: Job("bad", "/v1/completions", {"prompt": short_prompt(rng), "model": "no-such-model"}, 404,
                    param="model"),
    lambda rng: Job("bad", "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": short_prompt(rng)}], "n": 0}, 400, param="n"),
    lambda rng: Job("bad", "/v1/completions", b'{"prompt": "' + short_prompt(rng).encode() + b'", "max_tokens": 4', 400),
    lambda rng: Job("bad", "/v1/completions", {"prompt": long_prompt(rng), "echo": True, "logprobs": 5,
                                                "max_tokens": -3}, 400, param="max_tokens"),
]

SOAK_WEIGHTS = {
    "echo_logprobs": 14, "chat_n3": 14, "stop": 12, "stream_completion": 12, "stream_chat": 8,
    "disconnect_prefill": 10, "disconnect_stream": 12, "bad": 18,
}


def warmup_plan(rng: random.Random) -> list[Job]:
    """8 long echo+logprobs prompts first (they start together: the peak KV pages and logit rows
    the soak can reach), then every kind WARMUP_ROUNDS times, every bad-parameter case once."""
    jobs = [plan_one("echo_logprobs", rng) for _ in range(CONCURRENCY)]
    for _ in range(WARMUP_ROUNDS):
        jobs += [plan_one(kind, rng) for kind in SOAK_WEIGHTS if kind != "bad"]
    jobs += [make(rng) for make in BAD]
    return jobs


def soak_plan(rng: random.Random, n: int) -> list[Job]:
    kinds = rng.choices(list(SOAK_WEIGHTS), weights=list(SOAK_WEIGHTS.values()), k=n)
    return [plan_one(kind, rng) for kind in kinds]


def send(sock: socket.socket, job: Job) -> None:
    data = job.body if isinstance(job.body, bytes) else json.dumps(job.body).encode()
    head = (f"POST {job.path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n" + ("" if job.keep_alive else "Connection: close\r\n") + "\r\n")
    if job.split_body:
        sock.sendall(head.encode("latin-1"))
        sock.sendall(data)
    else:
        sock.sendall(head.encode("latin-1") + data)


def run_job(url: str, job: Job, t_origin: float) -> Result:
    t0 = time.monotonic() - t_origin
    sock = connect(url, REQUEST_TIMEOUT)
    status: int | None = None
    try:
        send(sock, job)
        if job.kind == "disconnect_prefill":
            return Result(job.kind, None, None, t0, time.monotonic() - t_origin)
        reader = Reader(sock)
        status, headers = reader.head()
        if job.kind == "disconnect_stream":
            problem = None if status == 200 else f"status {status}"
            seen = b""
            for chunk in reader.chunks(headers):
                seen += chunk
                if seen.count(b"\n\n") >= job.events_before_hang_up:
                    break
            else:
                problem = problem or "stream ended before the events we wanted"
            return Result(job.kind, status, problem, t0, time.monotonic() - t_origin)
        raw = b"".join(reader.chunks(headers))
        t1 = time.monotonic() - t_origin
        if status != job.expect:
            return Result(job.kind, status, f"status {status}, wanted {job.expect}", t0, t1,
                          raw[:300].decode(errors="replace"))
        if status != 200:
            body = json.loads(raw)
            problem = ("not an OpenAI error body" if not is_error_body(body)
                       else None if body["error"]["param"] == job.param else f"error.param is not {job.param!r}")
            return Result(job.kind, status, problem, t0, t1, raw[:300].decode(errors="replace"))
        streamed = isinstance(job.body, dict) and job.body.get("stream")
        answer = sse_events(raw) if streamed else json.loads(raw)
        problem = job.check(job.body, answer) if job.check else None
        return Result(job.kind, status, problem, t0, t1, "" if problem is None else raw[-300:].decode(errors="replace"))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return Result(job.kind, status, f"{type(e).__name__}: {e}", t0, time.monotonic() - t_origin)
    finally:
        hang_up(sock)


def run_all(url: str, jobs: list[Job], t_origin: float) -> list[Result]:
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda job: run_job(url, job, t_origin), jobs))


@dataclass
class RssSampler:
    """Samples the server's RSS in the background to report the peak (a measurement, not a sync)."""
    server: Server
    peak_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.peak_kb = max(self.peak_kb, self.server.rss_kb())
            except OSError:  # the server is gone: the test reports that itself
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def summarize(results: list[Result]) -> str:
    counts = collections.Counter((r.kind, r.status) for r in results)
    return ", ".join(f"{kind} {status if status is not None else 'hung-up'}: {n}"
                     for (kind, status), n in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)))


def failures(results: list[Result]) -> list[str]:
    bad = [r for r in results
           if r.problem is not None or (r.status is not None and (r.status == 408 or r.status >= 500))]
    return [f"{r.kind} status={r.status} at {r.t0:.1f}-{r.t1:.1f}s: {r.problem} {r.detail[:200]!r}" for r in bad]


def finish_reasons(url: str) -> dict[str, int]:
    """request_success_total by its finished_reason label (vLLM's name)."""
    out: dict[str, int] = {}
    for line in request(url, "GET", "/metrics")[2].decode().splitlines():
        if line.startswith("pyserve:request_success_total{"):
            labels, value = line.rsplit(" ", 1)
            if 'finished_reason="' in labels:
                reason = labels.split('finished_reason="', 1)[1].split('"', 1)[0]
                out[reason] = out.get(reason, 0) + int(float(value))
    return out


def mib(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB"


def test_soak_memory_bounded_and_pages_free(tmp_path: Path) -> None:
    try:
        from pyserve.model.loader import default_model_path

        default_model_path()
    except Exception as e:  # ModelLoadError, or the package itself missing
        pytest.skip(f"default model not available: {e}")

    rng = random.Random(SEED)
    warmup, soak = warmup_plan(rng), soak_plan(rng, SOAK_REQUESTS)
    t_origin = time.monotonic()
    with server_process(tmp_path / "server.log", "--mode", "server", "--max-num-sequence", str(CONCURRENCY)) as srv:
        rss_start, cpu_start = srv.rss_kb(), srv.cpu_s()
        warm = run_all(srv.url, warmup, t_origin)
        wait_until(srv.url, is_idle, IDLE_TIMEOUT, "engine idle after warm-up")
        rss_warm, m_warm, cpu_warm = srv.rss_kb(), metrics(srv.url), srv.cpu_s()
        finished_warm = finish_reasons(srv.url)
        t_soak = time.monotonic()
        with RssSampler(srv) as sampler:
            results = run_all(srv.url, soak, t_origin)
        soak_s = time.monotonic() - t_soak
        print(f"\nsoak: warm-up outcomes: {summarize(warm)}\nsoak: soak outcomes: {summarize(results)}")
        m_after = wait_until(srv.url, is_idle, IDLE_TIMEOUT, "engine idle after the soak")
        rss_after, cpu_after = srv.rss_kb(), srv.cpu_s()
        finished_after = finish_reasons(srv.url)
        alive = srv.proc.poll() is None
        log_tail = srv.log_tail()

    print(f"soak: {len(warmup)} warm-up + {len(results)} soak requests at concurrency {CONCURRENCY}, "
          f"soak {soak_s:.1f} s, total {time.monotonic() - t_origin:.1f} s; server CPU: start-up {cpu_start:.1f} s, "
          f"warm-up {cpu_warm - cpu_start:.1f} s, soak {cpu_after - cpu_warm:.1f} s")
    print(f"soak: RSS start {mib(rss_start)}, after warm-up {mib(rss_warm)}, soak peak {mib(sampler.peak_kb)}, "
          f"after {mib(rss_after)} ({rss_after / rss_warm:.3f} x warm-up; bound {RSS_SLACK})")
    for name, m, fin in (("after warm-up", m_warm, finished_warm), ("after soak", m_after, finished_after)):
        print(f"soak: {name}: KV pages used {m['pyserve:kv_pages_used']:.0f}, cached "
              f"{m.get('pyserve:kv_pages_cached', 0):.0f}, total {m['pyserve:kv_pages_total']:.0f}; engine requests "
              f"finished {fin}; prompt tokens {m['pyserve:prompt_tokens_total']:.0f}, generated "
              f"{m['pyserve:generation_tokens_total']:.0f}")
    timeouts = [r for r in warm + results if r.status == 408]
    if timeouts:
        print(f"soak: {len(timeouts)} x 408 at " + ", ".join(f"{r.kind}@{r.t0:.1f}s" for r in timeouts))

    problems = failures(warm) + failures(results)
    assert not problems, (f"{len(problems)} bad outcomes:\n" + "\n".join(problems[:30])
                          + f"\n--- server log\n{log_tail}")
    assert alive, f"server died during the soak\n{log_tail}"
    # Pages only the prefix cache holds are free memory (evictable); none may be held by a request.
    assert busy_pages(m_after) == 0, f"KV pages still held by requests: {m_after}"
    assert rss_after <= RSS_SLACK * rss_warm, (
        f"RSS grew from {mib(rss_warm)} after warm-up to {mib(rss_after)} after the soak (> {RSS_SLACK} x)")
