"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers loading the same GGUF
file (dequantised to float32): logits on prefill and decode, and greedy chat answers."""

from __future__ import annotations

import os

import anyio
import pytest
import torch

from engine_helpers import QUANTIZED_REL, assert_logits_close, c_model, our_logits
from pyserve.config import EngineConfig
from pyserve.engine.async_engine import AsyncEngine
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import default_model_path, load_model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colours."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
    [{"role": "user", "content": "def fib(n):\n    # complete this Python function"}],
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    return model, tok


def test_logits_match_transformers_on_prefill_and_16_decode_steps(gguf_path, hf_model) -> None:
    hf, tok = hf_model
    model = load_model(gguf_path)
    text = model.chat_template.render(CHATS[2], add_generation_prompt=True)
    prompt = model.tokenizer.encode(text, add_special_tokens=False)
    seq = torch.tensor([prompt])
    with torch.no_grad():
        gen = hf.generate(seq, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        ref = hf(gen).logits[0].numpy()
    cont = gen[0, len(prompt):].tolist()
    ours = our_logits(c_model(model), prompt, cont)
    assert_logits_close(ours, ref, rel=QUANTIZED_REL)


async def chat_greedy(path: str, chats: list[list[dict]], max_tokens: int) -> list[list[int]]:
    model = load_model(path)
    engine = AsyncEngine(model, EngineConfig(num_threads=2, kv_cache_tokens=4096))
    results: dict[int, list[int]] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)

        async def one(i: int, chat: list[dict]) -> None:
            ids = model.tokenizer.encode(model.chat_template.render(chat, add_generation_prompt=True), add_special_tokens=False)
            out: list[int] = []
            async for o in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
                out += o.new_token_ids
            results[i] = out

        async with anyio.create_task_group() as inner:
            for i, chat in enumerate(chats):
                inner.start_soon(one, i, chat)
        tg.cancel_scope.cancel()
    await engine.shutdown()
    return [results[i] for i in range(len(chats))]


def test_greedy_chat_answers_match_transformers(gguf_path, hf_model) -> None:
    hf, tok = hf_model
    ours = anyio.run(chat_greedy, gguf_path, CHATS, 32)
    for chat, got in zip(CHATS, ours):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        want = out[0, len(ids):].tolist()
        assert got == want, (tok.decode(got), tok.decode(want))
        assert len(got) > 3
