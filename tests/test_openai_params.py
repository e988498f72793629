"""Every issue-3 request parameter through the official OpenAI SDK against a real server on the
default model (SmolLM2-135M-Instruct, GGUF Q4_1). One server for the module; requests are greedy or
seeded and short, so results are deterministic and the module stays quick.

vLLM-style extras (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos, min_tokens) go
through `extra_body`, as vLLM documents for the SDK."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from pyserve.model.loader import default_model_path, load_model
from server_process import running_server

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"  # the default served name: the GGUF file's stem
COUNT = "1, 2, 3, 4,"  # greedy: " 5, 6, 7, 8, ..."
FRANCE = "The capital of France is"  # greedy: " Paris."
STORY = "Once upon a time"
YES_NO = [{"role": "user", "content": "Reply with one word: yes or no?"}]  # greedy: "Yes." then EOS


@pytest.fixture(scope="module")
def server():
    with running_server(default_model_path()) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(default_model_path(), load_tensors=False).tokenizer


def complete(client: OpenAI, prompt=COUNT, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=MODEL_ID, prompt=prompt, **kw)


def text_of(client: OpenAI, prompt=COUNT, **kw) -> str:
    return complete(client, prompt, **kw).choices[0].text


def chat(client: OpenAI, messages=YES_NO, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kw)


def bad_request(fn, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        fn()
    assert info.value.status_code == 400
    assert info.value.body["param"] == param, info.value.body


# --- models ------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client, server):
    [card] = client.models.list().data
    assert card.id == MODEL_ID and card.object == "model"
    assert card.model_extra["max_model_len"] == 8192
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_another_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=YES_NO, max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", max_tokens=2)


def test_no_model_field_means_the_served_one(server):
    # The SDK insists on a model; a plain HTTP client may leave it out.
    r = httpx.post(server + "/v1/completions", json={"prompt": FRANCE, "max_tokens": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == MODEL_ID


# --- sampling ------------------------------------------------------------------------------------------


def test_temperature_zero_is_greedy(client):
    a = complete(client, STORY, max_tokens=8)
    b = complete(client, STORY, max_tokens=8, seed=1)
    c = complete(client, STORY, max_tokens=8, seed=2)
    assert a.choices[0].text == b.choices[0].text == c.choices[0].text
    assert a.system_fingerprint and a.choices[0].finish_reason == "length"


def test_seed_gives_the_same_output(client):
    runs = [text_of(client, STORY, max_tokens=10, temperature=1.0, seed=s) for s in (7, 7, 8, 9)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) > 1  # other seeds sample something else


def test_n_choices_are_seed_plus_i(client):
    many = complete(client, STORY, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    # Choice i samples with seed + i, so it equals a single request seeded that way.
    for i, choice in enumerate(many.choices):
        assert choice.text == text_of(client, STORY, max_tokens=8, temperature=1.0, seed=7 + i)
    again = complete(client, STORY, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]
    one = complete(client, STORY, max_tokens=8, temperature=1.0, seed=7)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    assert many.usage.completion_tokens == 3 * 8


def test_chat_n(client):
    r = chat(client, n=2, temperature=1.0, seed=3, max_completion_tokens=5)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.message.content for c in r.choices)


@pytest.mark.parametrize(
    "kw",
    [
        {"top_p": 0.01},
        {"extra_body": {"top_k": 1}},
        {"extra_body": {"min_p": 1.0}},
    ],
    ids=["top_p", "top_k", "min_p"],
)
def test_truncation_to_one_token_is_greedy(client, kw):
    greedy = text_of(client, STORY, max_tokens=10)
    sampled = [text_of(client, STORY, max_tokens=10, temperature=1.0, seed=s, **kw) for s in (1, 2)]
    assert sampled == [greedy, greedy]


def _logprobs(client, **kw) -> tuple[str, list[float]]:
    r = complete(client, COUNT, max_tokens=6, logprobs=0, **kw).choices[0]
    return r.text, r.logprobs.token_logprobs


def test_presence_and_frequency_penalties_act_on_generated_tokens(client):
    # Greedy " 5, 6," either way; logprobs show the penalties (they are taken after them). The
    # first " " (position 0) has no earlier generated copy: untouched. The second (position 3)
    # repeats it: penalized, or favoured with a negative penalty.
    text, base = _logprobs(client)
    assert text == " 5, 6,"
    for kw, sign in [({"presence_penalty": 2}, -1), ({"frequency_penalty": 1}, -1), ({"presence_penalty": -2}, 1)]:
        t, lp = _logprobs(client, **kw)
        assert t == text
        assert lp[0] == pytest.approx(base[0], abs=1e-4), kw
        assert sign * (lp[3] - base[3]) > 0.05, (kw, lp[3], base[3])


def test_repetition_penalty_counts_the_prompt(client):
    # The prompt's numbers and commas are penalized too: the count is abandoned.
    assert text_of(client, COUNT, max_tokens=6) == " 5, 6,"
    assert text_of(client, COUNT, max_tokens=6, extra_body={"repetition_penalty": 1.5}) != " 5, 6,"


def test_penalty_ranges(client):
    bad_request(lambda: complete(client, presence_penalty=2.5), "presence_penalty")
    bad_request(lambda: complete(client, frequency_penalty=-3), "frequency_penalty")
    bad_request(lambda: complete(client, extra_body={"repetition_penalty": 0}), "repetition_penalty")


def test_logit_bias(client, tokenizer):
    assert text_of(client, FRANCE, max_tokens=1) == " Paris"
    london = tokenizer.encode(" London", add_special_tokens=False)
    paris = tokenizer.encode(" Paris", add_special_tokens=False)
    assert len(london) == len(paris) == 1
    # +100 forces the token; -100 rules it out
    assert text_of(client, FRANCE, max_tokens=1, logit_bias={str(london[0]): 100}) == " London"
    assert text_of(client, FRANCE, max_tokens=1, logit_bias={str(paris[0]): -100}) != " Paris"
    bad_request(lambda: complete(client, logit_bias={str(tokenizer.vocab_size): 1}), "logit_bias")
    bad_request(lambda: complete(client, logit_bias={"1": 101}), "logit_bias")


# --- stopping -----------------------------------------------------------------------------------------


def test_stop_strings(client):
    assert text_of(client, COUNT, max_tokens=12) .startswith(" 5, 6, 7,")
    r = complete(client, COUNT, max_tokens=12, stop=" 7").choices[0]
    assert (r.text, r.finish_reason) == (" 5, 6,", "stop")
    r = complete(client, COUNT, max_tokens=12, stop=["zzz", "6"]).choices[0]
    assert (r.text, r.finish_reason) == (" 5, ", "stop")
    streamed = complete(client, COUNT, max_tokens=12, stop=[" 7"], stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " 5, 6,"
    assert chunks[-1].choices[0].finish_reason == "stop"
    many = [f"never{i}" for i in range(20)] + [" 7"]  # more than OpenAI's 4 is fine
    assert text_of(client, COUNT, max_tokens=12, stop=many) == " 5, 6,"


def test_chat_stop(client):
    r = chat(client, stop=["."], max_tokens=10).choices[0]
    assert (r.message.content, r.finish_reason) == ("Yes", "stop")


def test_stop_token_ids(client, tokenizer):
    comma = tokenizer.encode(",", add_special_tokens=False)
    assert len(comma) == 1
    r = complete(client, COUNT, max_tokens=12, extra_body={"stop_token_ids": comma})
    # the stopping token counts, its text is not shown (as vLLM does)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (" 5", "stop", 3)


def test_ignore_eos_and_min_tokens(client):
    r = chat(client, max_tokens=20)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Yes.", "stop")
    assert r.usage.completion_tokens < 10
    r = chat(client, max_tokens=20, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    r = chat(client, max_tokens=20, extra_body={"min_tokens": 10})
    assert r.usage.completion_tokens >= 10 and r.choices[0].message.content.startswith("Yes")


def test_max_tokens_and_max_completion_tokens(client):
    r = chat(client, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a story."}], temperature=0,
        max_completion_tokens=2, max_tokens=5,
    )
    assert r.usage.completion_tokens == 2  # max_completion_tokens wins
    bad_request(lambda: chat(client, max_tokens=0), "max_tokens")
    bad_request(lambda: chat(client, max_tokens=None, max_completion_tokens=0), "max_completion_tokens")
    assert complete(client, FRANCE, max_tokens=None).usage.completion_tokens <= 16  # completions default


# --- logprobs ---------------------------------------------------------------------------------------------


def test_chat_logprobs(client):
    r = chat(client, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=6,
             logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == choice.message.content
    for c in content:
        assert c.logprob <= 0 and c.bytes == list(c.token.encode("utf-8"))
        assert len(c.top_logprobs) == 3
        lps = [t.logprob for t in c.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert c.top_logprobs[0].token == c.token  # greedy: the chosen token is the likeliest
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)
    assert chat(client, logprobs=False).choices[0].logprobs is None
    bad_request(lambda: chat(client, logprobs=True, top_logprobs=21), "top_logprobs")


def test_chat_logprobs_stream_match(client):
    msgs = [{"role": "user", "content": "Write the Japanese word for Japan."}]
    full = chat(client, messages=msgs, max_tokens=8, logprobs=True, top_logprobs=2)
    chunks = list(chat(client, messages=msgs, max_tokens=8, logprobs=True, top_logprobs=2, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in full.choices[0].logprobs.content]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content
    # raw bytes of the tokens spell the text, even where a token holds part of a character
    assert bytes(b for c in streamed for b in c.bytes).decode("utf-8").startswith(full.choices[0].message.content)


def test_completion_logprobs(client):
    r = complete(client, FRANCE, max_tokens=4, logprobs=2).choices[0]
    lp = r.logprobs
    assert "".join(lp.tokens) == r.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for tok, off in zip(lp.tokens, lp.text_offset):
        assert r.text[off : off + len(tok)] == tok
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert 2 <= len(top) <= 3 and tok in top  # top 2 plus the chosen token
    bad_request(lambda: complete(client, logprobs=6), "logprobs")


def test_echo(client):
    r = complete(client, FRANCE, max_tokens=2, echo=True).choices[0]
    assert r.text == FRANCE + text_of(client, FRANCE, max_tokens=2)


def test_echo_with_logprobs_scores_the_prompt(client):
    r = complete(client, FRANCE, max_tokens=0, echo=True, logprobs=1)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == FRANCE and r.usage.completion_tokens == 0
    assert "".join(lp.tokens) == FRANCE and len(lp.tokens) == r.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    for tok, off in zip(lp.tokens, lp.text_offset):
        assert choice.text[off : off + len(tok)] == tok
    # the prompt's logprobs followed by the generated ones
    gen = complete(client, FRANCE, max_tokens=2, echo=True, logprobs=1).choices[0]
    assert gen.logprobs.token_logprobs[: len(lp.tokens)] == pytest.approx([None, *lp.token_logprobs[1:]])
    assert gen.logprobs.text_offset[len(lp.tokens)] == len(FRANCE)
    # " Paris" is the likeliest next token: its generated logprob is the top one
    assert gen.logprobs.tokens[len(lp.tokens)] == " Paris"


# --- streaming, usage, prompts ---------------------------------------------------------------------------


def test_stream_include_usage(client):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = chat(client, messages=msgs, max_tokens=6)
    chunks = list(chat(client, messages=msgs, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.system_fingerprint for c in chunks)
    *body, last = chunks
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in body)
    assert full.usage.prompt_tokens_details.cached_tokens >= 0
    comp_chunks = list(complete(client, stream=True, stream_options={"include_usage": True}))
    assert comp_chunks[-1].usage.completion_tokens == 6


def test_user_field_accepted(client):
    assert chat(client, user="user-1234").choices[0].message.content


def test_prompt_forms(client, tokenizer):
    single = [text_of(client, p, max_tokens=4) for p in (FRANCE, COUNT)]
    batch = complete(client, [FRANCE, COUNT], max_tokens=4)
    assert [c.text for c in batch.choices] == single
    ids = tokenizer.encode(FRANCE, add_special_tokens=False)
    assert text_of(client, ids, max_tokens=4) == single[0]
    ids2 = tokenizer.encode(COUNT, add_special_tokens=False)
    batch = complete(client, [ids, ids2], max_tokens=4, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [single[0], single[0], single[1], single[1]]
    assert batch.usage.prompt_tokens == len(ids) + len(ids2)


def test_validation_through_the_sdk(client):
    bad_request(lambda: chat(client, temperature=2.5), "temperature")
    bad_request(lambda: chat(client, extra_body={"top_k": "many"}), "top_k")
    bad_request(lambda: chat(client, n=0), "n")
    bad_request(lambda: chat(client, extra_body={"stop": 5}), "stop")
    bad_request(lambda: chat(client, extra_body={"min_tokens": -1}), "min_tokens")
    bad_request(lambda: complete(client, extra_body={"echo": "yes"}), "echo")
    bad_request(lambda: chat(client, tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
                "tools[0].function.parameters")
    bad_request(lambda: chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}), "response_format")
    # unknown fields are ignored; a text response_format asks for nothing special
    assert chat(client, extra_body={"some_new_field": {"x": 1}}, response_format={"type": "text"}).choices
