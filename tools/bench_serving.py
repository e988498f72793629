#!/usr/bin/env python3
"""Serving benchmark: starts `python -m pyserve` (or uses --url), sends streaming completions at
several concurrency levels and prints vLLM's serving metrics: output throughput, TTFT, TPOT =
(latency - TTFT) / (output tokens - 1), ITL, with p50/p99. Then the same load against llama.cpp's
llama-server on the same file (`-np` = the highest concurrency, `-c` 512 tokens a slot, same
threads; built by tools/peer_llamacpp.py outside the repo), and the ratios.

    python tools/bench_serving.py [--model PATH] [--concurrency 1 4 16] [--prompt-words 100]
                                  [--max-tokens 64] [--threads 2] [--skip-llamacpp]
Both servers and this load generator share the machine's cores: the figures are lower bounds, the
ratios fair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

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
    args = ap.parse_args()

    from server_process import running_server

    from pyserve.model.loader import default_model_path

    def bench(url: str, who: str) -> dict[int, float]:
        with urllib.request.urlopen(url + "/v1/models") as r:
            model = json.loads(r.read())["data"][0]["id"]
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
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peer_llamacpp

    peer_dir = args.peer_dir or peer_llamacpp.default_peer_dir()
    if not peer_llamacpp.is_built(peer_dir):
        print(f"\nllama-server not built in {peer_dir}: run python tools/peer_llamacpp.py build")
        return 0
    with peer_llamacpp.llama_server(path, peer_dir, threads=args.threads, ctx=512 * slots, slots=slots) as srv:
        peer = bench(srv.url, f"llama-server -np {slots} -c {512 * slots} ({peer_llamacpp.version(peer_dir)})")
    print("\n| concurrency | pyserve out tok/s | llama-server out tok/s | pyserve ÷ llama-server |")
    print("|------------:|------------------:|-----------------------:|-----------------------:|")
    for c in args.concurrency:
        print(f"| {c:11d} | {ours[c]:17.1f} | {peer[c]:22.1f} | {ours[c] / peer[c]:21.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
