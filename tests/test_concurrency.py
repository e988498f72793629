"""32 concurrent streaming clients, each with its own seed and sampling parameters, get exactly the
text each gets alone: batching with strangers changes nothing (default model, pyserve's server)."""

from __future__ import annotations

import concurrent.futures

import pytest

from live_server import make_app, pyserve_server, request, sse_events, stream_text, wait_idle

CLIENTS = 32


@pytest.fixture(scope="module")
def server():
    app = make_app(max_num_sequence=CLIENTS, max_total_sequence_length=8192)
    with pyserve_server(app) as srv:
        yield srv


def params(i: int) -> tuple[str, dict]:
    """Client i's request: chat or completions, and a mix of sampling settings."""
    sampling = {
        "seed": 1000 + i,
        "temperature": (0.0, 0.7, 1.0, 1.3)[i % 4],
        "top_p": (1.0, 0.9, 0.8)[i % 3],
        "max_tokens": 8 + i % 9,
        "stream": True,
    }
    if i % 5 == 1:
        sampling["top_k"] = 20
    if i % 6 == 2:
        sampling["frequency_penalty"] = 0.5
    if i % 7 == 3:
        sampling["stop"] = ["."]
    if i % 2:
        return "/v1/completions", {"prompt": f"Story number {i}: once upon a time", **sampling}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell me a fact about {i}."}], **sampling}


def run(url: str, i: int) -> tuple[str, list]:
    path, body = params(i)
    status, headers, raw = request(url, "POST", path, body)
    assert status == 200, raw
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    finish = [c["finish_reason"] for e in events if isinstance(e, dict) for c in e["choices"] if c.get("finish_reason")]
    return stream_text(events), finish


def test_32_concurrent_streams_match_their_solo_runs(server) -> None:
    alone = [run(server.url, i) for i in range(CLIENTS)]
    wait_idle(server.url)
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        together = list(pool.map(lambda i: run(server.url, i), range(CLIENTS)))
    different = [i for i in range(CLIENTS) if together[i] != alone[i]]
    assert not different, [(i, alone[i], together[i]) for i in different]
    assert len({text for text, _ in alone}) > CLIENTS // 2  # the clients really asked different things
    wait_idle(server.url)
