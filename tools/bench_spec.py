#!/usr/bin/env python3
"""Speculative decoding benchmark: decode tok/s of each --speculative-mode against `disable` on the
same model and machine, in the same run, with acceptance rates.

    python tools/bench_spec.py [--model PATH] [--modes disable ngram small_draft medusa eagle]
                               [--draft PATH] [--medusa DIR] [--eagle DIR] [--concurrency 1 4 16]
                               [--max-tokens 128] [--threads 2]

For each mode a server (`python -m pyserve --speculative-mode MODE`; all up at once, measured in
alternation, best of --rounds) answers two workloads of streamed greedy chat requests,
`concurrency` at a time:
  grounded   rewrite / quote / edit a passage or a code file given in the prompt (the answer
             mostly copies its input: what prompt lookup is for)
  chat       open-ended questions (little to copy)
Decode tok/s is the output tokens after the first divided by the time after the first token,
summed over the concurrent requests (prefill is excluded: speculation does not touch it).
Acceptance comes from the server's /metrics (drafts accepted / drafts verified, and the mean
tokens a verifying step emits). Every mode's answers must equal `disable`'s (greedy): a
difference is printed as a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

PASSAGE = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the harbour. Every evening the keeper climbed "
    "the one hundred and twelve steps to the lamp room, trimmed the wick, polished the great lens and wound the "
    "clockwork that turned it. Ships coming home in the dark counted its flashes, three short and one long, and "
    "knew they were safe. In the winter storms the waves broke over the gallery and the whole tower shook, but "
    "the light never went out."
)
CODE = '''def merge_sorted(a, b):
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
'''
GROUNDED = [
    f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
    f"Rewrite the following passage in the past perfect tense, changing nothing else:\n\n{PASSAGE}",
    f"Copy this Python function and rename it to merge_lists:\n\n{CODE}",
    f"Add a docstring to this Python function and return the whole function:\n\n{CODE}",
    f"Quote the second and third sentences of this text:\n\n{PASSAGE}",
    f"Rewrite this function so that it uses the variable names left and right instead of a and b:\n\n{CODE}",
    f"Fix any spelling mistakes in this text and return it in full:\n\n{PASSAGE.replace('the ', 'teh ', 3)}",
    f"Convert this function's comments and code to use four-space indentation and return it:\n\n{CODE}",
]
CHAT = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works to a ten-year-old.",
    "What are three good habits for staying healthy? Explain each one.",
    "Describe a walk through a forest in autumn.",
    "Why is the sky blue? Give a detailed answer.",
    "Give me some advice for my first day at a new job.",
    "Write a poem about the sea.",
    "What would you pack for a week-long camping trip, and why?",
]


def stream_chat(url: str, model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    """One streamed greedy chat request (`extra`: more request fields); its text, token count,
    finish reason and timings."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                       **(extra or {})}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, text, tokens, finish = None, [], 0, None
    with urllib.request.urlopen(req, timeout=900) as resp:
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                piece = c.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
                finish = c.get("finish_reason") or finish
    return {"text": "".join(text), "tokens": tokens, "finish": finish, "t0": t0, "first": first or time.perf_counter(),
            "end": time.perf_counter()}


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics") as r:
        body = r.read().decode()
    m = re.search(rf"^pyserve:{name}\{{[^}}]*\}} (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def run_workload(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Every prompt once (repeated until there are `concurrency` of them, so that as many are in
    flight), `concurrency` at a time; decode tok/s over the whole run."""
    prompts = prompts * -(-concurrency // len(prompts))
    results: list[dict] = [{}] * len(prompts)
    before = {k: metric(url, k) for k in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                                          "spec_decode_num_accepted_tokens_total")}
    next_index = iter(range(len(prompts)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            results[i] = stream_chat(url, model, prompts[i], max_tokens)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Decode throughput: tokens after each request's first, over the span from the first first-token
    # to the last end (all requests decode in that window, prefill of later ones aside).
    decode_tokens = sum(max(r["tokens"] - 1, 0) for r in results)
    per_request = [max(r["tokens"] - 1, 0) / max(r["end"] - r["first"], 1e-9) for r in results]
    span = max(r["end"] for r in results) - min(r["first"] for r in results)
    after = {k: metric(url, k) - before[k] for k in before}
    return {
        "texts": [r["text"] for r in results],
        "tok_s": decode_tokens / span if concurrency > 1 else sum(per_request) / len(per_request),
        "verifies": after["spec_decode_num_drafts_total"],
        "drafts": after["spec_decode_num_draft_tokens_total"],
        "accepted": after["spec_decode_num_accepted_tokens_total"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the bundled model)")
    ap.add_argument("--modes", nargs="+", default=["disable", "ngram"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-length", type=int, default=0, help="--spec-draft-length (0: automatic)")
    ap.add_argument("--rounds", type=int, default=2, help="measurements per mode (alternating); the best counts")
    ap.add_argument("--draft", default=None, help="small_draft's draft model (--additional-models; default: the "
                    "target itself, which every draft matches: the mode's overhead with perfect acceptance)")
    ap.add_argument("--medusa", default=None, help="medusa's heads (tools/train_medusa.py's directory)")
    ap.add_argument("--eagle", default=None, help="eagle's draft (tools/train_eagle.py's directory)")
    args = ap.parse_args()

    from bench_serving import model_id
    from server_process import running_server

    from pyserve.model.loader import default_model_path

    path = args.model or default_model_path()
    os.environ.setdefault("PYSERVE_TEST_QUIET", "1")
    os.environ["PYSERVE_TEST_THREADS"] = str(args.threads)
    workloads = {"grounded": GROUNDED, "chat": CHAT}
    table: dict[tuple[str, str, int], dict] = {}
    with contextlib.ExitStack() as stack:
        # Every mode's server up at once (one computes at a time), measured in alternation, best of
        # --rounds: this VM's speed drifts by a fifth from minute to minute.
        servers = {}
        for mode in args.modes:
            flags = ["--speculative-mode", mode, "--max-num-sequence", str(max(args.concurrency)),
                     "--spec-draft-length", str(args.draft_length)]
            if mode == "small_draft":
                flags += ["--additional-models", args.draft or path]
            elif mode in ("medusa", "eagle"):
                trained = getattr(args, mode)
                if not trained:
                    ap.error(f"--modes {mode} needs --{mode} DIR (tools/train_{mode}.py makes it)")
                flags += ["--additional-models", trained]
            url = stack.enter_context(running_server(path, *flags))
            model = model_id(url)
            stream_chat(url, model, "Hello!", 8)  # warm up
            servers[mode] = (url, model)
        for name, prompts in workloads.items():
            for c in args.concurrency:
                for _ in range(args.rounds):
                    for mode, (url, model) in servers.items():
                        r = run_workload(url, model, prompts, c, args.max_tokens)
                        best = table.get((mode, name, c))
                        if best is None or r["tok_s"] > best["tok_s"]:
                            table[(mode, name, c)] = r
                        print(f"{mode:>8} {name:>8} c={c:<3} {r['tok_s']:7.1f} tok/s", flush=True)

    print(f"\n{os.path.basename(path)}, {args.threads} threads, greedy, {args.max_tokens} tokens an answer, "
          f"draft length {args.draft_length or 'automatic'}")
    print("| workload | concurrency | mode | decode tok/s | vs disable | drafts accepted | tokens / verifying step | same output |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    failures = 0
    for name in workloads:
        for c in args.concurrency:
            base = table.get(("disable", name, c))
            for mode in args.modes:
                r = table[(mode, name, c)]
                ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
                rate = f"{r['accepted'] / r['drafts']:.0%}" if r["drafts"] else "-"
                per_step = f"{(r['accepted'] + r['verifies']) / r['verifies']:.2f}" if r["verifies"] else "-"
                same = "-" if not base else ("yes" if r["texts"] == base["texts"] else "NO")
                failures += same == "NO"
                print(f"| {name} | {c} | {mode} | {r['tok_s']:.1f} | {ratio} | {rate} | {per_step} | {same} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
