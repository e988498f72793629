#!/usr/bin/env python3
"""Train Medusa heads for a target by self-distillation, on the CPU, for --speculative-mode medusa.

    python tools/train_medusa.py [--model PATH] [--out DIR] [--heads 4] [--draft-vocab 8192]
                                 [--prompts 768] [--answer-tokens 128] [--minutes 20] [--threads 2]

Head k (1-based) reads the target's final-normed hidden state at position t, the one whose LM
head gave token t+1, and proposes token t+1+k (Medusa-1: Cai et al., 2024):
    h_k = h + SiLU(W_k h + b_k)            (W_k starts at zero: h_k = h)
    logits_k = E_d h_k                     (E_d: the target's LM head rows of the draft vocabulary)
The LM head stays frozen and is shared by every head. It is cut down to the draft vocabulary, the
--draft-vocab tokens most frequent in the target's answers (the idea of FR-Spec, Zhao et al.,
2025): the full 49k-row head reads about a third of what a whole step of the default model reads.

1. Data: the target's answers (greedy, and sampled at temperature 0.7) to chat prompts made from
   topics x question forms (tools/self_distill.py); 1 answer in 8 is held out.
2. Features: the target's final hidden states over prompt + answer (transformers, float32).
3. Training: cross-entropy on the answer's own later tokens, head k weighted 0.8^(k-1), AdamW,
   for --minutes. Held-out top-1 accuracy per head, and the chance that heads 1..k are all right
   (what a chain of k drafts keeps), are printed as it goes.
4. Saved to DIR: medusa.safetensors (medusa.K.weight [H, H] and medusa.K.bias [H] in float32,
   draft_vocab int32 [N]) and config.json {"architecture": "medusa", ...}.

Then: python -m pyserve --speculative-mode medusa --additional-models DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def main() -> int:
    from self_distill import add_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, "/tmp/pyserve-medusa", "the heads'")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    ap.add_argument("--batch", type=int, default=1024, help="positions per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    import torch
    from safetensors.numpy import save_file

    from self_distill import draft_vocabulary, load_teacher, target_features, training_answers

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    K = args.heads

    path, train, held = training_answers(args)
    teacher, _ = load_teacher(path)
    head = teacher.get_output_embeddings().weight.detach()  # [V, H]
    V, H = head.shape

    vocab, covered = draft_vocabulary(train, V, args.draft_vocab)
    n_vocab = len(vocab)
    to_draft = torch.full((V,), -1, dtype=torch.long)
    to_draft[torch.from_numpy(vocab).long()] = torch.arange(n_vocab)
    print(f"draft vocabulary: {n_vocab} tokens cover {covered:.1%} of the training answers' tokens", flush=True)
    head_d = head[torch.from_numpy(vocab).long()].contiguous()  # [N, H]

    def features(items) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [P, H] at every position t from the prompt's last on, and the labels
        [P, K] (token t+1+k in the draft vocabulary; -1 past the end; -2 outside the vocabulary)."""
        xs, ys = [], []
        with torch.no_grad():
            for it, hidden in zip(items, target_features(teacher, items)):  # hidden: [T, H], final-normed
                toks = it.prompt + it.answer
                first = len(it.prompt) - 1
                xs.append(hidden[first: len(toks) - 1])
                lab = torch.full((len(toks) - 1 - first, K), -1, dtype=torch.long)
                for k in range(1, K + 1):
                    later = torch.tensor(toks[first + 1 + k:], dtype=torch.long)
                    mapped = to_draft[later]
                    lab[: len(later), k - 1] = torch.where(mapped >= 0, mapped, torch.full_like(mapped, -2))
                ys.append(lab)
        return torch.cat(xs), torch.cat(ys)

    x_train, y_train = features(train)
    x_held, y_held = features(held)
    print(f"features: {len(x_train)} training and {len(x_held)} held-out positions, "
          f"{(time.perf_counter() - t0) / 60:.1f} min", flush=True)

    W = torch.zeros(K, H, H, requires_grad=True)
    b = torch.zeros(K, H, requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=args.lr, weight_decay=0.0)
    weights = torch.tensor([0.8 ** k for k in range(K)])

    def heads_logits(x: torch.Tensor) -> torch.Tensor:  # x: [P, H] -> [K, P, N]
        h = x.unsqueeze(0) + torch.nn.functional.silu(torch.einsum("kij,pj->kpi", W, x) + b.unsqueeze(1))
        return h @ head_d.T

    def evaluate() -> str:
        with torch.no_grad():
            right = []
            for i in range(0, len(x_held), 4096):
                pred = heads_logits(x_held[i: i + 4096]).argmax(-1).T  # [P, K]
                right.append(pred == y_held[i: i + 4096])
            right = torch.cat(right)
            valid = y_held != -1
            top1 = [(right[:, k] & valid[:, k]).sum().item() / max(valid[:, k].sum().item(), 1) for k in range(K)]
            chain = torch.cumprod(right.int(), 1).bool()
            whole = valid[:, K - 1]
            chain_rate = [(chain[:, k] & whole).sum().item() / max(whole.sum().item(), 1) for k in range(K)]
        return ("top-1 per head " + " ".join(f"{v:.1%}" for v in top1) +
                "; heads 1..k all right " + " ".join(f"{v:.1%}" for v in chain_rate))

    print(f"held-out before training: {evaluate()}", flush=True)
    deadline = time.perf_counter() + args.minutes * 60
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    while time.perf_counter() < deadline:
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), args.batch):
            if time.perf_counter() >= deadline:
                break
            idx = order[i: i + args.batch]
            logits = heads_logits(x_train[idx])  # [K, B, N]
            y = y_train[idx].T  # [K, B]
            loss = 0
            for k in range(K):
                keep = y[k] >= 0
                if keep.any():
                    loss = loss + weights[k] * torch.nn.functional.cross_entropy(logits[k][keep], y[k][keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step}: loss {loss.item():.3f}, held-out {evaluate()}, "
                      f"{(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    print(f"after {step} steps, held-out: {evaluate()}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    tensors = {"draft_vocab": vocab}
    for k in range(K):
        tensors[f"medusa.{k}.weight"] = W[k].detach().numpy().copy()
        tensors[f"medusa.{k}.bias"] = b[k].detach().numpy().copy()
    save_file(tensors, os.path.join(args.out, "medusa.safetensors"))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"architecture": "medusa", "num_heads": K, "hidden_size": H, "vocab_size": V,
                   "draft_vocab_size": n_vocab, "target": os.path.basename(path)}, f, indent=2)
    print(f"{K} Medusa heads saved to {args.out}; {(time.perf_counter() - t0) / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
