#!/usr/bin/env python3
"""Structured-output benchmark: decode tok/s of grammar-constrained chat requests against the same
requests unconstrained, on one server, in the same run, with the cost of the allowed-token masks.

    python tools/bench_structured.py [--model PATH] [--concurrency 1 16] [--max-tokens 128]
                                     [--rounds 3] [--threads 2]

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
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from bench_serving import model_id  # noqa: E402 - the tools' and tests' folders are on the path now
from bench_spec import metric, stream_chat  # noqa: E402
from server_process import running_server  # noqa: E402

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


def run_round(url: str, model: str, concurrency: int, max_tokens: int, constrained: bool) -> dict:
    """`concurrency` requests at once; decode tok/s summed over them, and the mask counters' deltas."""
    results: list[dict] = [{}] * concurrency
    errors: list[BaseException] = []
    before = (metric(url, MASKS), metric(url, MASK_SECONDS))

    def one(i: int) -> None:
        try:
            results[i] = stream_chat(url, model, PROMPT.format(k=i + 1), max_tokens,
                                     {"response_format": RESPONSE_FORMAT} if constrained else {"ignore_eos": True})
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
    args = ap.parse_args()

    from pyserve.model import default_model_path

    path = args.model or default_model_path()
    # SIGTERM unwinds like Ctrl-C, so the server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    best: dict[tuple[str, int], dict] = {}
    mask_totals: dict[int, list[float]] = {c: [0.0, 0.0] for c in args.concurrency}
    failures: list[str] = []
    os.environ.setdefault("PYSERVE_TEST_QUIET", "1")
    os.environ["PYSERVE_TEST_THREADS"] = str(args.threads)
    with running_server(path, "--max-num-sequence", str(max(args.concurrency))) as url:
        model = model_id(url)
        # Warm up both paths (the grammar compiles once and is cached per constraint).
        stream_chat(url, model, "Hello!", 8)
        sample = stream_chat(url, model, PROMPT.format(k=1), args.max_tokens, {"response_format": RESPONSE_FORMAT})
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
