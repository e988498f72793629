"""The server as a subprocess on a free port, driven by the OpenAI SDK and by raw sockets: the
default model (GGUF), a transformers-made HF directory, and a .gguf path."""

from __future__ import annotations

import json
import socket

import pytest
from openai import OpenAI

import tiny_models
from pyserve.model.loader import default_model_path
from server_process import running_server


@pytest.fixture(scope="module")
def default_server():
    with running_server(default_model_path()) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> str:
    return tiny_models.make_llama(tmp_path_factory.mktemp("tiny-llama-hf"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    hf = tiny_models.make_qwen2(tmp_path_factory.mktemp("tiny-qwen2-hf"))
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf")
    return tiny_models.write_gguf(hf, path, quant="Q8_0") or path


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def exercise_sdk(url: str, *, expect_words: bool) -> None:
    c = client(url)
    models = c.models.list().data
    assert len(models) == 1
    name = models[0].id

    chat = c.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0
    )
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 5
    if expect_words:
        assert "Paris" in text

    chunks = list(
        c.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
            temperature=0, stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text  # streaming and not give the same greedy text
    assert len({ch.id for ch in chunks}) == 1

    comp = c.completions.create(model=name, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model=name, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
        if ch.choices
    )
    assert streamed == comp.choices[0].text


def test_sdk_against_the_default_model(default_server) -> None:
    exercise_sdk(default_server, expect_words=True)


def test_sdk_against_a_hf_directory(tiny_hf_dir) -> None:
    with running_server(tiny_hf_dir) as url:
        exercise_sdk(url, expect_words=False)


def test_sdk_against_a_gguf_path(tiny_gguf) -> None:
    with running_server(tiny_gguf) as url:
        exercise_sdk(url, expect_words=False)


# --- raw sockets ----------------------------------------------------------------------------------


def raw_request(sock: socket.socket, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    sock.sendall(head.encode() + b"\r\n" + (body or b""))
    f = sock.makefile("rb")
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", 0))
    payload = f.read(n)
    return status, headers, payload


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=60)
    return s


def assert_error(status: int, body: bytes, want_status: int, param: str | None = "unset") -> dict:
    assert status == want_status, body
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert set(err) >= {"message", "type", "param", "code"}
    if param != "unset":
        assert err["param"] == param
    return err


def test_keep_alive_two_requests_on_one_connection(default_server) -> None:
    with connect(default_server) as s:
        st1, _, b1 = raw_request(s, "GET", "/v1/models")
        body = json.dumps({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
        st2, _, b2 = raw_request(s, "POST", "/v1/completions", body)
    assert st1 == 200 and json.loads(b1)["data"]
    assert st2 == 200 and json.loads(b2)["choices"][0]["text"] is not None


@pytest.mark.parametrize(
    "method,path,body,status,param",
    [
        ("GET", "/v1/nope", None, 404, "unset"),
        ("GET", "/v1/chat/completions", None, 405, "unset"),
        ("POST", "/v1/chat/completions", b"{not json", 400, "unset"),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400, "unset"),
        ("POST", "/v1/chat/completions", b'{"max_tokens": 3}', 400, "messages"),
        ("POST", "/v1/completions", b'{"max_tokens": 3}', 400, "prompt"),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(default_server, method, path, body, status, param) -> None:
    with connect(default_server) as s:
        st, _, b = raw_request(s, method, path, body)
    assert_error(st, b, status, param)
    with connect(default_server) as s:
        st, _, b = raw_request(s, "GET", "/health")
    assert st == 200


def test_over_long_prompt_names_both_numbers(default_server) -> None:
    c = client(default_server)
    limit = c.models.list().data[0].model_extra["max_model_len"]
    body = json.dumps({"prompt": "hello " * (limit + 10), "max_tokens": 4}).encode()
    with connect(default_server) as s:
        st, _, b = raw_request(s, "POST", "/v1/completions", body)
    err = assert_error(st, b, 400)
    assert str(limit) in err["message"]
    assert any(str(n) in err["message"] for n in range(limit + 1, limit * 3))
    with connect(default_server) as s:
        st, _, _ = raw_request(s, "GET", "/health")
    assert st == 200
