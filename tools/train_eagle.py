#!/usr/bin/env python3
"""Train an EAGLE draft for a target by self-distillation, on the CPU, for --speculative-mode eagle.

    python tools/train_eagle.py [--model PATH] [--out DIR] [--draft-vocab 8192] [--prompts 768]
                                [--answer-tokens 128] [--minutes 25] [--data FILE] [--threads 2]

The draft (EAGLE, Li et al. 2024) is one decoder layer of the target's shape. Its input at
position p is fc([f_{p-1}; e(t_p)]): the target's final hidden state at the row that drew token
t_p, and that token's embedding; its output g_p (after its own final norm) stands in for f_p, so
the target's LM head turns it into the next token, and drafting feeds it back as the next f.
    loss = SmoothL1(g_p, f_p) + 0.1 * CE(E_d g_p, t_{p+1})
E_d: the target's LM head rows for the draft vocabulary (the --draft-vocab tokens most frequent in
the answers; FR-Spec's idea), frozen. The layer starts as a copy of the target's last layer and
fc as half of each input; the features get a little noise, so that the draft learns to read its
own imperfect output too (as EAGLE does).

1. Data: the target's answers (greedy, and sampled at temperature 0.7) to chat prompts made from
   topics x question forms (tools/self_distill.py; --data caches them); 1 in 8 held out.
2. Features: the target's final hidden states over prompt + answer (transformers, float32).
3. Training: AdamW for --minutes. Held-out accuracy is printed as it goes: how often the draft's
   first token is the target's (teacher-forced), and its second when it reads its own output.
4. Saved to DIR: eagle.safetensors (model.layers.0.*, model.norm.weight, fc.weight, fc.bias in
   float32; draft_vocab int32) and config.json {"architecture": "eagle", ...}.

Then: python -m pyserve --speculative-mode eagle --additional-models DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def main() -> int:
    from self_distill import add_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, "/tmp/pyserve-eagle", "the draft's")
    ap.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--noise", type=float, default=0.1, help="feature noise, relative to the features' scale")
    args = ap.parse_args()

    import torch
    from safetensors.numpy import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from self_distill import draft_vocabulary, load_teacher, target_features, training_answers

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    path, train, held = training_answers(args)
    teacher, _ = load_teacher(path)
    embed = teacher.get_input_embeddings().weight.detach()  # [V, H]
    head = teacher.get_output_embeddings().weight.detach()  # [V, H]
    V, H = head.shape
    vocab, covered = draft_vocabulary(train, V, args.draft_vocab)
    to_draft = torch.full((V,), -1, dtype=torch.long)
    to_draft[torch.from_numpy(vocab).long()] = torch.arange(len(vocab))
    head_d = head[torch.from_numpy(vocab).long()].contiguous()  # [N, H]
    print(f"draft vocabulary: {len(vocab)} tokens cover {covered:.1%} of the training answers' tokens", flush=True)

    def examples(items):
        feats = target_features(teacher, items)
        return [(torch.tensor(a.prompt + a.answer), f, len(a.prompt)) for a, f in zip(items, feats)]

    ex_train, ex_held = examples(train), examples(held)
    scale = torch.cat([f for _, f, _ in ex_train[:64]]).std().item()
    print(f"features: {sum(len(t) for t, _, _ in ex_train)} training and {sum(len(t) for t, _, _ in ex_held)} "
          f"held-out positions, {(time.perf_counter() - t0) / 60:.1f} min", flush=True)

    # -- the draft: the target's last layer, its final norm, and fc ------------------------------
    tc = teacher.config
    cfg = LlamaConfig(**{**tc.to_dict(), "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]})
    cfg.vocab_size, cfg.pad_token_id = 1, None  # the draft's own embeddings and head are never used
    draft = LlamaForCausalLM(cfg).model
    last = teacher.model.layers[tc.num_hidden_layers - 1]
    draft.layers[0].load_state_dict(last.state_dict())
    draft.norm.load_state_dict(teacher.model.norm.state_dict())
    fc = torch.nn.Linear(2 * H, H)
    with torch.no_grad():
        fc.weight.copy_(0.5 * torch.cat([torch.eye(H), torch.eye(H)], 1))
        fc.bias.zero_()
    params = list(draft.layers.parameters()) + list(draft.norm.parameters()) + list(fc.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def pad(items):
        """tokens [B, T], features [B, T, H], valid [B, T] (positions p >= 1 with a next token)."""
        T = max(len(t) for t, _, _ in items)
        x = torch.zeros(len(items), T, dtype=torch.long)
        f = torch.zeros(len(items), T, H)
        valid = torch.zeros(len(items), T, dtype=torch.bool)
        for i, (t, feat, _) in enumerate(items):
            x[i, : len(t)] = t
            f[i, : len(t)] = feat
            valid[i, : len(t) - 1] = True
        return x, f, valid

    def run_draft(x, feats_before):
        """g: [B, T, H] from the tokens and the features that drew them (feats_before[:, p] = f_{p-1})."""
        inputs = fc(torch.cat([feats_before, embed[x]], -1))
        return draft(inputs_embeds=inputs).last_hidden_state

    def shifted(f):  # f_{p-1} at p, zeros at 0
        return torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], 1)

    def evaluate() -> str:
        hit1 = hit2 = total = 0
        with torch.no_grad():
            for i in range(0, len(ex_held), args.batch):
                items = ex_held[i: i + args.batch]
                x, f, valid = pad(items)
                answer = torch.zeros_like(valid)
                for j, (_, _, n_prompt) in enumerate(items):
                    answer[j, n_prompt - 1:] = True
                g = run_draft(x, shifted(f))  # teacher-forced: g_p from f_{p-1}
                want = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)  # t_{p+1}
                pred1 = torch.from_numpy(vocab).long()[(g @ head_d.T).argmax(-1)]
                g2 = run_draft(x, shifted(g))  # the second draft reads the first's output
                pred2 = torch.from_numpy(vocab).long()[(g2 @ head_d.T).argmax(-1)]
                mask = valid & answer
                mask[:, -1] = False
                right1 = (pred1 == want) & mask
                # the second draft stands on the first: t_{p+1} right at p, then t_{p+2} from g2 at p+1
                right2 = right1[:, :-1] & (pred2[:, 1:] == want[:, 1:]) & mask[:, 1:]
                hit1 += int(right1.sum())
                hit2 += int(right2.sum())
                total += int(mask.sum())
        return f"first draft {hit1 / max(total, 1):.1%}, first two {hit2 / max(total, 1):.1%}"

    print(f"held-out before training: {evaluate()}", flush=True)
    deadline = time.perf_counter() + args.minutes * 60
    step = 0
    while time.perf_counter() < deadline:
        random.shuffle(ex_train)
        for i in range(0, len(ex_train), args.batch):
            if time.perf_counter() >= deadline:
                break
            x, f, valid = pad(ex_train[i: i + args.batch])
            noisy = f + (torch.rand_like(f) * 2 - 1) * args.noise * scale
            g = run_draft(x, shifted(noisy))
            reg = torch.nn.functional.smooth_l1_loss(g[valid], f[valid])
            labels = to_draft[torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)][valid]
            keep = labels >= 0
            cls = torch.nn.functional.cross_entropy(g[valid][keep] @ head_d.T, labels[keep])
            loss = reg + 0.1 * cls
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step}: regression {reg.item():.4f}, classification {cls.item():.3f}, "
                      f"held-out {evaluate()}, {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    print(f"after {step} steps, held-out: {evaluate()}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    tensors = {"draft_vocab": vocab}
    for name, value in draft.layers[0].state_dict().items():
        tensors[f"model.layers.0.{name}"] = value.detach().float().numpy().copy()
    tensors["model.norm.weight"] = draft.norm.weight.detach().float().numpy().copy()
    tensors["fc.weight"] = fc.weight.detach().numpy().copy()
    tensors["fc.bias"] = fc.bias.detach().numpy().copy()
    save_file(tensors, os.path.join(args.out, "eagle.safetensors"))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"architecture": "eagle", "hidden_size": H, "vocab_size": V, "draft_vocab_size": len(vocab),
                   "target": os.path.basename(path)}, f, indent=2)
    print(f"EAGLE draft saved to {args.out}; {(time.perf_counter() - t0) / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
