"""The prefix cache and MLC's debug routes through the real server on the default model: a shared
system prompt is reported as cached_tokens (chat and completions, streamed and not) and counted in
/metrics; greedy answers are the same with the cache off; --enable-debug mounts dump_engine_metrics,
reset_engine (empties the cache, pinned prompts too) and dump_event_trace (--enable-tracing), whose
output is valid trace-event JSON; without it those routes are 404 and debug_config is ignored."""

from __future__ import annotations

import concurrent.futures
import json

import pytest

from live_server import is_idle, make_app, metrics, pyserve_server, request, sse_events, stream_text, wait_idle, wait_until

SYSTEM = " ".join(f"Rule {i}: answer questions about topic {i} briefly and politely." for i in range(30))


def chat(url: str, question: str, stream: bool = False, **extra) -> tuple[str, dict]:
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "max_tokens": 8, "temperature": 0, "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    status, _h, raw = request(url, "POST", "/v1/chat/completions", body)
    assert status == 200, raw
    if not stream:
        out = json.loads(raw)
        return out["choices"][0]["message"]["content"], out["usage"]
    events = sse_events(raw)
    usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    return stream_text(events), usage[-1]


@pytest.fixture(scope="module")
def debug_server():
    app = make_app(max_num_sequence=4, enable_tracing=True, app_options={"enable_debug": True})
    with pyserve_server(app) as srv:
        yield srv


def test_a_shared_system_prompt_is_reported_cached(debug_server, caplog) -> None:
    caplog.set_level("INFO", logger="pyserve.access")
    url = debug_server.url
    request(url, "POST", "/debug/reset_engine", {})
    wait_idle(url)
    before = metrics(url)
    text0, usage0 = chat(url, "What is topic 3?")
    assert usage0["prompt_tokens_details"]["cached_tokens"] == 0
    text1, usage1 = chat(url, "What is topic 4?")
    # Everything up to where the questions differ: the system prompt and the user turn's header.
    cached = usage1["prompt_tokens_details"]["cached_tokens"]
    assert usage1["prompt_tokens"] - 12 < cached < usage1["prompt_tokens"]
    _text, usage2 = chat(url, "What is topic 5?", stream=True)
    assert usage2["prompt_tokens_details"]["cached_tokens"] == cached
    # The same question again: all but the last prompt token (it is computed, to sample from).
    again, usage3 = chat(url, "What is topic 3?")
    assert again == text0 and usage3["prompt_tokens_details"]["cached_tokens"] == usage3["prompt_tokens"] - 1
    status, _h, raw = request(url, "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2})
    first_completion = json.loads(raw)["usage"]
    assert status == 200 and first_completion["prompt_tokens_details"]["cached_tokens"] >= 0
    assert first_completion["prompt_tokens_details"]["cached_tokens"] == 0  # nothing like it was asked before
    status, _h, raw = request(url, "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2})
    completion_usage = json.loads(raw)["usage"]
    assert completion_usage["prompt_tokens_details"]["cached_tokens"] == completion_usage["prompt_tokens"] - 1
    assert f"cached_tokens={cached}" in caplog.text  # the access log says what the cache served
    after = wait_idle(url)
    queried = after["pyserve:prefix_cache_queries_total"] - before["pyserve:prefix_cache_queries_total"]
    hits = after["pyserve:prefix_cache_hits_total"] - before["pyserve:prefix_cache_hits_total"]
    assert queried == usage0["prompt_tokens"] * 2 + usage1["prompt_tokens"] + usage2["prompt_tokens"] + 2 * 4
    assert hits >= 2 * cached + usage3["prompt_tokens"] - 1
    assert after["pyserve:kv_pages_cached"] > 0 and after["pyserve:kv_pages_used"] == 0


def test_greedy_answers_do_not_depend_on_the_cache(debug_server) -> None:
    questions = [f"Tell me about topic {i}." for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        warm = list(pool.map(lambda q: chat(debug_server.url, q)[0], questions))
    app = make_app(max_num_sequence=4, prefix_cache_mode="disable")
    with pyserve_server(app) as cold_server:
        cold = [chat(cold_server.url, q) for q in questions]
        assert all(u["prompt_tokens_details"]["cached_tokens"] == 0 for _t, u in cold)
        assert metrics(cold_server.url)["pyserve:kv_pages_cached"] == 0
    assert warm == [t for t, _u in cold]


def test_reset_engine_empties_the_cache_and_pinned_prompts_survive_until_then(debug_server) -> None:
    url = debug_server.url
    chat(url, "Pin me.", debug_config={"pinned_system_prompt": True})
    m = wait_idle(url)
    status, _h, raw = request(url, "POST", "/debug/dump_engine_metrics", {})
    assert status == 200
    dumped = json.loads(raw)
    assert dumped["kv_pages_cached"] == m["pyserve:kv_pages_cached"] and dumped["kv_pages_used"] == 0
    assert dumped["prefix_cache_hits_total"] >= 0 and "kv_pages_free" in dumped
    assert dumped["prefix_cache_hits_total"] == m["pyserve:prefix_cache_hits_total"]
    status, _h, _raw = request(url, "POST", "/debug/reset_engine", {})
    assert status == 200
    # The engine thread resets at its next look at its inbox (before any later request).
    wait_until(url, lambda m: is_idle(m) and m["pyserve:kv_pages_cached"] == 0, what="the reset")
    dumped = json.loads(request(url, "POST", "/debug/dump_engine_metrics", {})[2])
    assert dumped["kv_pages_cached"] == 0 and dumped["kv_pages_free"] == dumped["kv_pages_total"]
    # After a reset nothing is cached: the next request computes its whole prompt.
    _t, usage = chat(url, "Pin me.")
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    status, _h, raw = request(url, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "x"}], "debug_config": {"ignore_eos": 3}})
    assert status == 400 and json.loads(raw)["error"]["param"] == "debug_config.ignore_eos"


def test_a_pinned_prompt_outlives_its_request() -> None:
    """With no finished sequence kept (recycling 0) a finished request's pages leave the cache at
    once, unless its prompt was pinned."""
    app = make_app(max_num_sequence=2, prefix_cache_max_num_recycling_seqs=0, app_options={"enable_debug": True})
    with pyserve_server(app) as srv:
        chat(srv.url, "Not pinned.")
        _t, usage = chat(srv.url, "Not pinned.")
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        chat(srv.url, "Pin me.", debug_config={"pinned_system_prompt": True})
        _t, usage = chat(srv.url, "Pin me.")
        assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16


def test_the_event_trace_is_trace_event_json(debug_server) -> None:
    url = debug_server.url
    chat(url, "Trace me.")
    wait_idle(url)
    status, _h, raw = request(url, "POST", "/debug/dump_event_trace", {})
    assert status == 200
    trace = json.loads(raw)
    events = trace["traceEvents"]
    assert events and all({"ph", "ts", "pid", "tid", "name"} <= set(e) for e in events)
    names = {e["name"] for e in events}
    assert {"queued", "prefill", "decode", "finish", "step"} <= names
    steps = [e for e in events if e["name"] == "step"]
    assert all(e["ph"] == "X" and e["dur"] >= 0 and e["tid"] == 0 for e in steps)
    prefills = [e for e in events if e["name"] == "prefill"]
    assert all("cached" in e["args"] and e["args"]["tokens"] > 0 for e in prefills)
    finishes = [e for e in events if e["name"] == "finish"]
    assert all(e["args"]["reason"] in ("stop", "length", "abort", "error") for e in finishes)


def test_without_enable_debug_the_routes_are_404_and_debug_config_is_ignored() -> None:
    app = make_app(max_num_sequence=2)
    with pyserve_server(app) as srv:
        for path in ("/debug/dump_engine_metrics", "/debug/reset_engine", "/debug/dump_event_trace"):
            status, _h, raw = request(srv.url, "POST", path, {})
            assert status == 404, raw
        status, _h, raw = request(srv.url, "POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                   "debug_config": {"ignore_eos": "not even a bool"}})
        assert status == 200, raw


def test_dump_event_trace_without_tracing_says_how_to_turn_it_on() -> None:
    app = make_app(max_num_sequence=2, app_options={"enable_debug": True})
    with pyserve_server(app) as srv:
        status, _h, raw = request(srv.url, "POST", "/debug/dump_event_trace", {})
        assert status == 400 and "--enable-tracing" in json.loads(raw)["error"]["message"]
