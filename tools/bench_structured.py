#!/usr/bin/env python3
"""Structured-output benchmark: decode tok/s of grammar-constrained chat requests against the same
requests unconstrained, on one server, in the same run, with the cost of the allowed-token masks.

    python tools/bench_structured.py [--model PATH] [--concurrency 1 16] [--max-tokens 128]
                                     [--rounds 3] [--threads 2] [--port 0]

One server (`python -m pyserve --max-num-sequence MAX(concurrency)`) answers, at each concurrency C,
C streamed greedy chat requests at once ("List groceries for a party of k people as JSON.",
k = 1..C) in two forms:
  free   no constraint, `ignore_eos` and --max-tokens: every answer is --max-tokens long
  json   response_format json_schema (strict): {"items": [{name, qty, tags}, ...]} with at least 40
         items, which cannot close within --max-tokens, so the grammar never allows EOS and every
         answer is --max-tokens long too (checked: finish_reason length)
Free and json rounds alternate (best of --rounds: this VM's speed drifts from minute to minute).
Decode tok/s is the output tokens after the first divided by the time after the first token, summed
over the concurrent requests (as tools/bench_spec.py: prefill is excluded). The mask cost comes
from the server's /metrics: structured_output_mask_seconds_total / structured_output_masks_total
over the json rounds, per token, and as a share of the json run's wall time per token. The issue's
goal: json keeps >= 90% of free decode tok/s at batch 1 and 16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Iterator

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

GOAL = 0.90
PROMPT = "List groceries for a party of {k} people as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "qty": {"type": "integer"},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                },
                "required": ["name", "qty", "tags"],
            },
        },
    },
    "required": ["items"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "groceries", "schema": SCHEMA, "strict": True}}
MASKS, MASK_SECONDS = "structured_output_masks_total", "structured_output_mask_seconds_total"


@contextlib.contextmanager
def server(path: str, port: int, threads: int, max_seqs: int) -> Iterator[str]:
    """`python -m pyserve` on `port` (0: a free one); yields its URL once /health answers. Stopped with
    SIGINT on the way out (killed if it hangs); it dies with this process even if we are killed."""
    from server_process import free_port, stop_gracefully, wait_until_healthy

    port = port or free_port()
    cmd = [sys.executable, "-m", "pyserve", path, "--port", str(port), "--num-threads", str(threads),
           "--max-num-sequence", str(max_seqs)]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        try:
            url = wait_until_healthy(proc, port, 180.0, what=" ".join(cmd))
        except RuntimeError:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            raise
        yield url
    finally:
        try:
            stop_gracefully(proc)
        except AssertionError as e:  # the numbers stand; say the server did not stop cleanly
            print(f"warning: {e}", file=sys.stderr)
        log.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when this benchmark dies, however it dies (Linux)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def model_id(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models") as r:
        return json.loads(r.read())["data"][0]["id"]


def metric(url: str, name: str) -> float:
    """A counter from /metrics, summed over its series; the prefix (pyserve: or vllm:) is not checked."""
    with urllib.request.urlopen(url + "/metrics") as r:
        body = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^\w+:{name}(?:\{{[^}}]*\}})? (\S+)$", body, re.M))


def stream_chat(url: str, model: str, prompt: str, max_tokens: int, constrained: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = RESPONSE_FORMAT
    else:
        body["ignore_eos"] = True
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
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
    return {"text": "".join(text), "tokens": tokens, "finish": finish, "first": first or time.perf_counter(),
            "end": time.perf_counter()}


def run_round(url: str, model: str, concurrency: int, max_tokens: int, constrained: bool) -> dict:
    """`concurrency` requests at once; decode tok/s summed over them, and the mask counters' deltas."""
    results: list[dict] = [{}] * concurrency
    errors: list[BaseException] = []
    before = (metric(url, MASKS), metric(url, MASK_SECONDS))

    def one(i: int) -> None:
        try:
            results[i] = stream_chat(url, model, PROMPT.format(k=i + 1), max_tokens, constrained)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    masks, mask_s = metric(url, MASKS) - before[0], metric(url, MASK_SECONDS) - before[1]
    # As bench_spec: tokens after each request's first over the span from the earliest first token to
    # the last end (c > 1), or the request's own rate (c = 1).
    decode_tokens = sum(max(r["tokens"] - 1, 0) for r in results)
    span = max(r["end"] for r in results) - min(r["first"] for r in results)
    short = [r for r in results if r["tokens"] != max_tokens or r["finish"] != "length"]
    return {"tok_s": decode_tokens / max(span, 1e-9), "masks": masks, "mask_s": mask_s,
            "short": [(r["tokens"], r["finish"]) for r in short]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the bundled model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="measurements per form (alternating); the best counts")
    ap.add_argument("--threads", type=int, default=2, help="the server's --num-threads")
    ap.add_argument("--port", type=int, default=0, help="the server's port (0: a free one)")
    args = ap.parse_args()

    from pyserve.model import default_model_path

    path = args.model or default_model_path()
    # SIGTERM unwinds like Ctrl-C, so the server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    best: dict[tuple[str, int], dict] = {}
    mask_totals: dict[int, list[float]] = {c: [0.0, 0.0] for c in args.concurrency}
    failures: list[str] = []
    with server(path, args.port, args.threads, max(args.concurrency)) as url:
        model = model_id(url)
        # Warm up both paths (the grammar compiles once and is cached per constraint).
        stream_chat(url, model, "Hello!", 8, constrained=False)
        sample = stream_chat(url, model, PROMPT.format(k=1), args.max_tokens, constrained=True)
        print(f"json sample ({sample['tokens']} tokens, finish {sample['finish']}): {sample['text'][:200]!r}")
        if not sample["text"].lstrip().startswith("{"):
            failures.append("the constrained answer does not start with '{'")
        for c in args.concurrency:
            for i in range(args.rounds):
                # Alternate which form goes first, so a drift within a round falls on both.
                for form in (("free", "json") if i % 2 == 0 else ("json", "free")):
                    r = run_round(url, model, c, args.max_tokens, constrained=form == "json")
                    if form == "json":
                        mask_totals[c][0] += r["masks"]
                        mask_totals[c][1] += r["mask_s"]
                    elif r["masks"]:
                        failures.append(f"free c={c}: {r['masks']:.0f} masks computed for unconstrained requests")
                    if r["short"]:
                        failures.append(f"{form} c={c}: {len(r['short'])} answers not {args.max_tokens} tokens "
                                        f"with finish length: {r['short'][:3]}")
                    if (form, c) not in best or r["tok_s"] > best[(form, c)]["tok_s"]:
                        best[(form, c)] = r
                    print(f"{form:>5} c={c:<3} round {i + 1}: {r['tok_s']:7.1f} tok/s", flush=True)

    print(f"\n{os.path.basename(path)}, {args.threads} threads, greedy, {args.max_tokens} tokens an answer, "
          f"best of {args.rounds} alternating rounds")
    print("| concurrency | free tok/s | json tok/s | json / free | json µs / token | mask µs / token | "
          f"mask share of json token time | goal >= {GOAL:.0%} |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in args.concurrency:
        free, js = best[("free", c)]["tok_s"], best[("json", c)]["tok_s"]
        masks, mask_s = mask_totals[c]
        mask_us = mask_s / masks * 1e6 if masks else float("nan")
        # The engine thread computes masks one after another: wall time per token is 1 / (json tok/s).
        share = mask_us * 1e-6 * js
        ratio = js / free
        print(f"| {c} | {free:.1f} | {js:.1f} | {ratio:.2f} | {1e6 / js:.0f} | {mask_us:.1f} | {share:.1%} | "
              f"{'yes' if ratio >= GOAL else 'NO'} |")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
