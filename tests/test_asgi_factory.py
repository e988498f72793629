"""pyserve.asgi.create_app: the same flags from PYSERVE_ARGS or keyword arguments; the app mounted
inside a host ASGI app (Starlette), with and without the host running its lifespan; and the real
`uvicorn --factory pyserve.asgi:create_app` command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from live_server import pyserve_server, request, wait_idle
from pyserve import cli
from pyserve.asgi import args_from, create_app
from pyserve.model.loader import default_model_path

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"


# --- flags ----------------------------------------------------------------------------------------


def test_flags_come_from_pyserve_args(monkeypatch) -> None:
    monkeypatch.delenv("PYSERVE_API_KEY", raising=False)
    monkeypatch.setenv("PYSERVE_ARGS", "my/model.gguf --mode server --api-key 'sk x' --allow-origins '[\"https://a.b\"]'")
    args = args_from()
    assert args.model == "my/model.gguf" and args.engine_config.mode == "server"
    assert args.api_key == "sk x" and args.allow_origins == ["https://a.b"]
    monkeypatch.setenv("PYSERVE_ARGS", "")
    args = args_from()
    assert args.model is None and args.api_key is None  # the bundled model, defaults
    monkeypatch.delenv("PYSERVE_ARGS")
    assert args_from().model is None


def test_keyword_arguments_are_the_flags(monkeypatch) -> None:
    monkeypatch.setenv("PYSERVE_ARGS", "--mode server")  # ignored once the caller passes options
    args = args_from("m.gguf", max_num_sequence=3, api_key="k", allow_origins=[], allow_credentials=True,
                     served_model_name="smol", max_waiting_requests=0, overrides="page_size=32")
    assert args.model == "m.gguf" and args.engine_config.mode == "local"
    assert (args.engine_config.max_num_sequence, args.engine_config.page_size) == (3, 32)
    assert (args.api_key, args.allow_origins, args.allow_credentials) == ("k", [], True)
    assert (args.served_model_name, args.max_waiting_requests) == ("smol", 0)
    assert args_from(argv="--mode interactive").engine_config.mode == "interactive"
    assert args_from(argv=["--mode", "server"], num_threads=2).engine_config.num_threads == 2


def test_max_tokens_bounds_from_pyserve_args_and_keywords(monkeypatch) -> None:
    monkeypatch.setenv("PYSERVE_ARGS", "-n 300 --max-tokens-default 100")
    args = args_from()
    assert (args.max_tokens_limit, args.max_tokens_default) == (300, 100)
    args = args_from(max_tokens_limit=50)
    assert (args.max_tokens_limit, args.max_tokens_default) == (50, None)
    with pytest.raises(cli.ArgumentError, match="exceeds"):
        args_from(max_tokens_limit=5, max_tokens_default=6)


def test_max_tokens_bounds_reach_the_served_app() -> None:
    """create_app's keywords bound generation on the real model: a request asking more is capped
    (finish_reason "length"), one asking nothing gets the default."""
    llm = create_app(num_threads=2, max_tokens_limit=5, max_tokens_default=3)
    with pyserve_server(llm) as srv:
        base = {"messages": [{"role": "user", "content": "Count from one to a hundred."}], "temperature": 0,
                "ignore_eos": True}  # the budget, never EOS, ends the answer
        for extra, tokens in (({"max_tokens": 50}, 5), ({}, 3), ({"max_tokens": 2}, 2)):
            status, _, body = request(srv.url, "POST", "/v1/chat/completions", {**base, **extra})
            assert status == 200, body
            reply = json.loads(body)
            assert reply["usage"]["completion_tokens"] == tokens, (extra, reply)
            assert reply["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "kwargs, match",
    [({"mode": "turbo"}, "--mode"), ({"bogus": 1}, "unknown option 'bogus'"), ({"port": 70000}, "port"),
     ({"max_num_sequence": 4, "overrides": "max_num_sequence=8"}, "both")],
)
def test_bad_options_raise_instead_of_exiting(kwargs, match) -> None:
    with pytest.raises(cli.ArgumentError, match=match):
        create_app(**kwargs)


def test_missing_model_raises_build_error() -> None:
    with pytest.raises(cli.BuildError) as info:
        create_app("/nonexistent/model.gguf")
    assert info.value.exit_code == 1
    with pytest.raises(cli.BuildError, match="--device cuda is not available") as info:
        create_app("/nonexistent/model.gguf", device="cuda")  # checked before the model
    assert info.value.exit_code == 2


# --- mounted in a host app --------------------------------------------------------------------------


def host_app(llm, events: list[str], with_lifespan: bool):
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    @asynccontextmanager
    async def lifespan(app):
        events.append("host startup")
        async with llm.lifespan():  # the mounted app's engine loop runs inside the host's lifespan
            yield
        events.append("host shutdown")

    async def home(request):
        return PlainTextResponse("host home")

    return Starlette(routes=[Route("/", home), Mount("/llm", app=llm)], lifespan=lifespan if with_lifespan else None)


@pytest.mark.parametrize("with_lifespan", [True, False], ids=["host-lifespan", "no-lifespan"])
def test_mounted_inside_a_starlette_app(with_lifespan: bool) -> None:
    pytest.importorskip("starlette")
    llm = create_app(num_threads=2, served_model_name="smol", api_key="k")
    events: list[str] = []
    with pyserve_server(host_app(llm, events, with_lifespan)) as srv:
        assert request(srv.url, "GET", "/")[2] == b"host home"
        status, _, body = request(srv.url, "GET", "/llm/v1/models", headers={"Authorization": "Bearer k"})
        assert status == 200 and json.loads(body)["data"][0]["id"] == "smol"
        assert request(srv.url, "GET", "/llm/v1/models")[0] == 401
        status, _, body = request(srv.url, "POST", "/llm/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
                                  headers={"Authorization": "Bearer k"})
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        assert request(srv.url, "GET", "/llm/health")[0] == 200
        assert b"pyserve:num_requests_running" in request(srv.url, "GET", "/llm/metrics")[2]
    if with_lifespan:
        assert events == ["host startup", "host shutdown"]
        assert llm.engine._closed  # the host's lifespan shut the engine down
    else:
        assert events == []


# --- the uvicorn command line --------------------------------------------------------------------


def test_uvicorn_factory_command_line(tmp_path) -> None:
    pytest.importorskip("uvicorn")
    from server_process import free_port, wait_until_healthy

    port = free_port()
    env = {**os.environ, "PYSERVE_ARGS": f"{default_model_path()} --mode server --num-threads 2 --max-num-sequence 4 --max-total-sequence-length 16384"}
    env.pop("PYSERVE_API_KEY", None)
    log = open(tmp_path / "uvicorn.log", "w+b")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "pyserve.asgi:create_app",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            url = wait_until_healthy(proc, port, 120, what="uvicorn")
        except RuntimeError as e:
            raise AssertionError(f"{e}:\n{(tmp_path / 'uvicorn.log').read_text()}") from None
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == MODEL_NAME
        chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=16, temperature=0,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content
        wait_idle(url)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    output = (tmp_path / "uvicorn.log").read_text()
    assert proc.returncode == 0, output
    assert "Application startup complete" in output and "Application shutdown complete" in output
    assert "mode=server" in output  # PYSERVE_ARGS reached the engine config
