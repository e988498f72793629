#!/usr/bin/env python3
"""Serving benchmark: starts `python -m pyserve` (or uses --url), sends streaming completions at
several concurrency levels and prints vLLM's serving metrics: output throughput, TTFT, TPOT =
(latency - TTFT) / (output tokens - 1), ITL, with p50/p99. Then the same load against llama.cpp's
llama-server on the same file (`-np` = the highest concurrency, `-c` 512 tokens a slot, same
threads; built by tools/peer_llamacpp.py outside the repo), and the ratios.

    python tools/bench_serving.py [--model PATH] [--concurrency 1 4 16] [--prompt-words 100]
                                  [--max-tokens 64] [--threads 2] [--skip-llamacpp]
    python tools/bench_serving.py --workload prefix [--model PATH] [--skip-llamacpp]

--workload prefix measures the prefix cache, one request at a time, with pyserve's cache on
(`--prefix-cache-mode radix`) and off (`disable`) and llama-server (`cache_prompt`, one slot):
  shared prefix  a ~1,000-token system prompt, then --questions short distinct questions behind it
                 (chat); TTFT p50 / p99 of the questions after the first, and the prompt tokens
                 the server actually prefilled for them (pyserve: its prompt_tokens_total counter;
                 llama-server: `timings.prompt_n`)
  multi-turn     one 8-turn chat, every turn resending the whole conversation (greedy answers of
                 --turn-tokens); per turn the tokens that are new in it (prompt tokens less the
                 previous turn's prompt and answer) against the tokens prefilled
Both servers and this load generator share the machine's cores: the figures are lower bounds, the
ratios fair.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from typing import Any, Iterator

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def stream_one(url: str, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
                       "stream": True, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps = []
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": stamps[0] - t0, "latency": end - t0, "n": len(stamps),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])]}


def run_level(url: str, model: str, concurrency: int, requests: int, prompt_words: int, max_tokens: int) -> float:
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        for i in counter:
            prompt = f"Request {i}. " + " ".join(["The quick brown fox jumps over the lazy dog."] * (prompt_words // 9))
            r = stream_one(url, model, prompt, max_tokens, seed=i)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out_tokens = sum(r["n"] for r in results)
    ttft = [r["ttft"] * 1e3 for r in results]
    tpot = [(r["latency"] - r["ttft"]) / (r["n"] - 1) * 1e3 for r in results if r["n"] > 1]
    itl = [x * 1e3 for r in results for x in r["itl"]]
    print(f"| {concurrency:11d} | {out_tokens / wall:17.1f} | {statistics.median(ttft):8.0f} | {percentile(ttft, 99):8.0f} "
          f"| {statistics.median(tpot):8.1f} | {percentile(tpot, 99):8.1f} | {statistics.median(itl):7.1f} | {percentile(itl, 99):7.1f} |",
          flush=True)
    return out_tokens / wall


# --- the prefix-cache workloads ------------------------------------------------------------------

SYSTEM_PROMPT = " ".join(
    f"Rule {i}: when a visitor asks about topic {i}, answer in at most {i % 5 + 2} sentences, cite the "
    f"handbook section {i}.{i % 7}, and never mention rule {(i * 7) % 40}." for i in range(40))
QUESTIONS = [f"Question {i}: what does the handbook say about the {w}?" for i, w in enumerate(
    "weather garden river harbour market library bridge tower orchard station museum forest".split())]
TURNS = ["Hello! Who are you?", "Tell me a short fact about the sea.", "And one about mountains?",
         "Which of the two do you prefer?", "Why?", "Give me a haiku about it.", "Now a shorter one.",
         "Thanks. Summarise our chat in one sentence."]


def prefilled_total(url: str) -> float | None:
    """pyserve's prompt_tokens_total (prefill tokens the engine computed), or None elsewhere."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = None
    for line in text.splitlines():
        if line.startswith("pyserve:prompt_tokens_total"):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def chat_once(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat completion: TTFT, the answer, usage, and prefilled tokens."""
    before = prefilled_total(url)
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, text, usage, timings = None, [], {}, {}
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(piece)
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    after = prefilled_total(url)
    prefilled = after - before if before is not None and after is not None else timings.get("prompt_n")
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "text": "".join(text),
            "prompt_tokens": usage.get("prompt_tokens", timings.get("prompt_n", 0) + timings.get("cache_n", 0)),
            "completion_tokens": usage.get("completion_tokens", 0),
            "cached": ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")), "prefilled": prefilled}


def shared_prefix(url: str, model: str, questions: int) -> dict:
    runs = [chat_once(url, model, [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}], 8)
            for q in (QUESTIONS * (questions // len(QUESTIONS) + 1))[: questions + 1]]
    warm = runs[1:]  # the first one fills the cache
    ttft = [r["ttft"] * 1e3 for r in warm]
    return {"prompt": runs[0]["prompt_tokens"], "cold_ttft": runs[0]["ttft"] * 1e3,
            "ttft_p50": statistics.median(ttft), "ttft_p99": percentile(ttft, 99),
            "prefilled": statistics.median([r["prefilled"] or 0 for r in warm]),
            "cached": statistics.median([r["cached"] or 0 for r in warm])}


def multi_turn(url: str, model: str, turn_tokens: int) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": "You are a concise assistant."}]
    rows, prev_prompt, prev_answer = [], 0, 0
    for question in TURNS:
        messages.append({"role": "user", "content": question})
        r = chat_once(url, model, messages, turn_tokens)
        messages.append({"role": "assistant", "content": r["text"]})
        rows.append({"ttft": r["ttft"] * 1e3, "prompt": r["prompt_tokens"],
                     "new": r["prompt_tokens"] - prev_prompt - prev_answer, "prefilled": r["prefilled"] or 0})
        prev_prompt, prev_answer = r["prompt_tokens"], r["completion_tokens"]
    return rows


def model_id(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models") as r:
        return json.loads(r.read())["data"][0]["id"]


@contextlib.contextmanager
def peer_server(args: argparse.Namespace, path: str, ctx: int, slots: int) -> Iterator[tuple[Any, str] | None]:
    """llama-server on the same file and threads, with its version: (server, version), or None
    (and a hint) when tools/peer_llamacpp.py has not built it."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peer_llamacpp

    peer_dir = args.peer_dir or peer_llamacpp.default_peer_dir()
    if not peer_llamacpp.is_built(peer_dir):
        print(f"\nllama-server not built in {peer_dir}: run python tools/peer_llamacpp.py build")
        yield None
        return
    with peer_llamacpp.llama_server(path, peer_dir, threads=args.threads, ctx=ctx, slots=slots) as srv:
        yield srv, peer_llamacpp.version(peer_dir)


def bench_prefix(args: argparse.Namespace, path: str) -> int:
    from server_process import running_server

    results: dict[str, tuple[dict, list[dict]]] = {}
    os.environ.setdefault("PYSERVE_TEST_QUIET", "1")
    os.environ["PYSERVE_TEST_THREADS"] = str(args.threads)
    for mode in ("radix", "disable"):
        with running_server(path, "--prefix-cache-mode", mode, "--max-num-sequence", "4") as url:
            model = model_id(url)
            results[f"pyserve, cache {'on' if mode == 'radix' else 'off'}"] = (
                shared_prefix(url, model, args.questions), multi_turn(url, model, args.turn_tokens))
    if not args.skip_llamacpp:
        with peer_server(args, path, ctx=8192, slots=1) as peer:
            if peer:
                srv, version = peer
                results[f"llama-server ({version})"] = (
                    shared_prefix(srv.url, model_id(srv.url), args.questions),
                    multi_turn(srv.url, model_id(srv.url), args.turn_tokens))

    first = next(iter(results.values()))[0]
    print(f"\n### shared prefix: a {first['prompt']}-token prompt (system + question), {args.questions} questions "
          "after the first, one at a time")
    print("| server | first TTFT ms | TTFT p50 ms | TTFT p99 ms | prefilled tokens / question | cached_tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for who, (sp, _mt) in results.items():
        cached = "-" if sp["cached"] is None else f"{sp['cached']:.0f}"
        print(f"| {who} | {sp['cold_ttft']:.0f} | {sp['ttft_p50']:.1f} | {sp['ttft_p99']:.1f} | {sp['prefilled']:.0f} | {cached} |")
    on, off = results.get("pyserve, cache on"), results.get("pyserve, cache off")
    if on and off:
        print(f"\nTTFT p50 cache off / on: {off[0]['ttft_p50'] / on[0]['ttft_p50']:.1f}x")

    print(f"\n### multi-turn: 8 turns, each resending the conversation ({args.turn_tokens}-token greedy answers)")
    print("| server | turn | prompt tokens | new tokens | prefilled | TTFT ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for who, (_sp, mt) in results.items():
        for i, row in enumerate(mt, 1):
            print(f"| {who} | {i} | {row['prompt']} | {row['new']} | {row['prefilled']:.0f} | {row['ttft']:.1f} |")
    print("\n| server | new tokens, all turns | prefilled | prefilled / new (turns 2-8) |")
    print("|---|---:|---:|---:|")
    for who, (_sp, mt) in results.items():
        later = mt[1:]
        ratio = sum(r["prefilled"] for r in later) / max(1, sum(r["new"] for r in later))
        print(f"| {who} | {sum(r['new'] for r in mt)} | {sum(r['prefilled'] for r in mt):.0f} | {ratio:.2f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path for the server (default: the bundled model)")
    ap.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=100, help="about 128 prompt tokens by default")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="server threads, both servers (default 2)")
    ap.add_argument("--skip-llamacpp", action="store_true", help="no llama-server peer")
    ap.add_argument("--peer-dir", default=None, help="llama.cpp build (default: tools/peer_llamacpp.py's)")
    ap.add_argument("--workload", choices=["throughput", "prefix"], default="throughput")
    ap.add_argument("--questions", type=int, default=10, help="prefix: questions behind the shared system prompt")
    ap.add_argument("--turn-tokens", type=int, default=32, help="prefix: answer tokens per turn of the chat")
    args = ap.parse_args()
    if args.workload == "prefix":
        from pyserve.model.loader import default_model_path

        return bench_prefix(args, args.model or default_model_path())

    from server_process import running_server

    from pyserve.model.loader import default_model_path

    def bench(url: str, who: str) -> dict[int, float]:
        model = model_id(url)
        print(f"\n{who}: model {model}, ~{args.prompt_words * 1.3:.0f}-token prompts, {args.max_tokens} output tokens, streaming")
        print("| concurrency | output tok/s      | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 | ITL p99 |  (ms)")
        print("|------------:|------------------:|---------:|---------:|---------:|---------:|--------:|--------:|")
        return {c: run_level(url, model, c, c * args.requests_per_client, args.prompt_words, args.max_tokens)
                for c in args.concurrency}

    if args.url:
        bench(args.url.rstrip("/"), "server at " + args.url)
        return 0
    path = args.model or default_model_path()
    slots = max(args.concurrency)
    os.environ.setdefault("PYSERVE_TEST_QUIET", "1")
    os.environ["PYSERVE_TEST_THREADS"] = str(args.threads)  # running_server's --num-threads
    with running_server(path, "--max-num-sequence", str(slots)) as url:
        ours = bench(url, "pyserve")
    if args.skip_llamacpp:
        return 0
    with peer_server(args, path, ctx=512 * slots, slots=slots) as started:
        if started is None:
            return 0
        srv, version = started
        peer = bench(srv.url, f"llama-server -np {slots} -c {512 * slots} ({version})")
    print("\n| concurrency | pyserve out tok/s | llama-server out tok/s | pyserve ÷ llama-server |")
    print("|------------:|------------------:|-----------------------:|-----------------------:|")
    for c in args.concurrency:
        print(f"| {c:11d} | {ours[c]:17.1f} | {peer[c]:22.1f} | {ours[c] / peer[c]:21.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
