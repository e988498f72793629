#!/usr/bin/env python3
"""Teacher-forced top-1 agreement with the float32 reference, pyserve (and llama.cpp) on one GGUF.

    python tools/bench_fidelity.py [--model PATH] [--tokens 64] [--threads 2] [--skip-llamacpp]

The reference is transformers on the same GGUF, dequantized to float32. For each of ten fixed chat
prompts (the file's chat template applied; tokenized by pyserve) the reference answers
greedily (--tokens at most); then prompt + answer is scored in one forward by the reference and by
pyserve (`_C.Session.forward(ids, all_logits=True)`), and we count the answer's positions where the
two argmaxes agree. llama.cpp is scored through llama-server (built by tools/peer_llamacpp.py): one
/completion a position, the exact token ids as prompt, n_predict 1, greedy, its prompt cache reusing
the prefix; its greedy token is its argmax. Every engine sees the same token ids.
Run from the repo root (or with PYTHONPATH=<repo root>) so `pyserve` is the checkout's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

# transformers' GGUF loader draws progress bars with tqdm directly.
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_llamacpp  # noqa: E402

from pyserve import _C  # noqa: E402
from pyserve.engine.native import native_model  # noqa: E402
from pyserve.model.loader import default_model_path, load_model  # noqa: E402

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a ten-year-old.",
    "List three prime numbers greater than 20.",
    "How do I reverse a list in Python?",
    "Translate 'good morning, my friend' into Spanish.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
)


@dataclass
class Case:
    prompt_ids: list[int]
    answer_ids: list[int]
    ref_argmax: np.ndarray      # the reference's argmax at the positions that predict each answer token

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids


def prompt_ids(path: str) -> list[list[int]]:
    """The chat prompts as token ids: the file's chat template and tokenizer, read by pyserve (on the
    default model these ids equal transformers' apply_chat_template's, which takes ~40 s to load)."""
    m = load_model(path, load_tensors=False)
    return [m.tokenizer.encode(m.chat_template.render([{"role": "user", "content": t}], add_generation_prompt=True),
                               add_special_tokens=True) for t in PROMPTS]


def reference_cases(path: str, prompts: list[list[int]], n_tokens: int, threads: int, eos: list[int]) -> list[Case]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    d, name = os.path.split(path)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    cases = []
    with torch.inference_mode():
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=n_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
            answer = out[0, len(prompt):].tolist()
            logits = hf(torch.tensor([prompt + answer])).logits[0]
            # Position i predicts token i + 1: the answer's tokens are predicted from len(prompt) - 1 on.
            ref = logits[len(prompt) - 1: len(prompt) - 1 + len(answer)].argmax(-1).numpy()
            cases.append(Case(prompt, answer, ref))
    return cases


def pyserve_argmax(path: str, cases: list[Case], threads: int) -> list[np.ndarray]:
    model = load_model(path)
    cm = native_model(model, threads, release_tensors=True)
    out = []
    for c in cases:
        s = _C.Session(cm, len(c.ids) + 1)
        logits = np.asarray(s.forward(c.ids, True))
        out.append(logits[len(c.prompt_ids) - 1: len(c.ids) - 1].argmax(-1))
    return out


def _top_id(resp: dict) -> int:
    """The greedy token of a one-token /completion (fields differ across llama-server versions)."""
    if resp.get("tokens"):
        return int(resp["tokens"][0])
    probs = resp.get("completion_probabilities") or []
    if probs:
        p = probs[0]
        top = p.get("top_logprobs") or p.get("top_probs") or p.get("probs") or []
        if top:
            return int(top[0].get("id", top[0].get("tok_id")))
        return int(p["id"])
    raise ValueError(f"cannot find the token in {list(resp)}")


def llamacpp_argmax(path: str, cases: list[Case], threads: int, peer_dir: str) -> list[np.ndarray]:
    out = []
    ctx = max(len(c.ids) for c in cases) + 16
    with peer_llamacpp.llama_server(path, peer_dir, threads, ctx=ctx) as srv:
        for c in cases:
            got = []
            for i in range(len(c.prompt_ids), len(c.ids)):
                resp = srv.post("/completion", {
                    "prompt": c.ids[:i], "n_predict": 1, "temperature": 0.0, "top_k": 1, "n_probs": 1,
                    "cache_prompt": True, "return_tokens": True, "samplers": ["top_k"],
                })
                got.append(_top_id(resp))
            out.append(np.asarray(got))
    return out


def agreement(cases: list[Case], argmaxes: list[np.ndarray]) -> tuple[int, int, list[float]]:
    same = total = 0
    per = []
    for c, a in zip(cases, argmaxes):
        k = int((a == c.ref_argmax).sum())
        same += k
        total += len(c.answer_ids)
        per.append(100 * k / max(1, len(c.answer_ids)))
    return same, total, per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy answer tokens per prompt (at most)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-llamacpp", action="store_true")
    peer_llamacpp.add_peer_args(ap)
    args = ap.parse_args()
    path = args.model or default_model_path()

    t0 = time.perf_counter()
    prompts = prompt_ids(path)
    eos = load_model(path, load_tensors=False).eos_token_ids
    cases = reference_cases(path, prompts, args.tokens, args.threads, eos)
    n = sum(len(c.answer_ids) for c in cases)
    print(f"model: {os.path.basename(path)}; {len(cases)} prompts, {n} answer tokens "
          f"(reference: transformers float32, {time.perf_counter() - t0:.0f} s)")
    # Where the reference's own full forward disagrees with its cached greedy decode: near-ties.
    self_same = sum(int((c.ref_argmax == np.asarray(c.answer_ids)).sum()) for c in cases)
    print(f"reference full forward vs its own greedy decode: {100 * self_same / n:.1f}%")

    t0 = time.perf_counter()
    rows = [("pyserve", pyserve_argmax(path, cases, args.threads))]
    print(f"pyserve scored in {time.perf_counter() - t0:.1f} s")
    if args.skip_llamacpp:
        print("llama.cpp: skipped (--skip-llamacpp); the known figure on the default model is 95.4%")
    else:
        peer_llamacpp.ensure_built(args.peer_dir, args.jobs)
        t0 = time.perf_counter()
        rows.append(("llama.cpp", llamacpp_argmax(path, cases, args.threads, args.peer_dir)))
        print(f"llama.cpp scored in {time.perf_counter() - t0:.1f} s ({n} /completion requests)")
    print()
    print("| engine | top-1 agreement | agreeing / answer tokens | per prompt (%) |")
    print("|---|---:|---:|---|")
    for name, am in rows:
        same, total, per = agreement(cases, am)
        print(f"| {name} | {100 * same / total:.1f}% | {same} / {total} | {' '.join(f'{p:.0f}' for p in per)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
