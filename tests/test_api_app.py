"""The ASGI app outside generation: routing, models, health, request errors, lifespan."""
from __future__ import annotations

import anyio
import pytest

from api_fakes import FakeEngine, call  # tests/ is on sys.path (pytest rootdir insertion)
from pyserve.api import create_app
from pyserve.api.router import Router
from pyserve.protocol import ProtocolError


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def app(engine):
    return create_app(engine)


def assert_error(resp, status: int, param: str | None = "ANY", code: object = "ANY") -> dict:
    assert resp.status == status, resp.body
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["message"], str) and not err["message"].startswith("{")  # one JSON encoding
    if param != "ANY":
        assert err["param"] == param
    if code != "ANY":
        assert err["code"] == code
    return err


# --- router ------------------------------------------------------------------------------------


def test_router_matches_and_reports_404_405():
    async def h(req):
        pass

    r = Router()
    r.add("GET", "/a", h)
    r.add("POST", "/a", h)
    r.add("GET", "/m/{name:path}", h)
    r.add("GET", "/s/{id}", h)
    assert r.match("GET", "/a") == (h, {})
    assert r.match("GET", "/m/org/model") == (h, {"name": "org/model"})
    assert r.match("GET", "/s/x") == (h, {"id": "x"})
    with pytest.raises(ProtocolError) as e:
        r.match("GET", "/s/x/y")
    assert e.value.status == 404
    with pytest.raises(ProtocolError) as e:
        r.match("DELETE", "/a")
    assert e.value.status == 405 and e.value.headers == [("allow", "GET, POST")]


def test_unknown_path_404(app):
    err = assert_error(call(app, "GET", "/v1/nope"), 404, param=None)
    assert "/v1/nope" in err["message"]


@pytest.mark.parametrize("method, path, allow", [("GET", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET"), ("DELETE", "/health", "GET")])
def test_wrong_method_405_with_allow(app, method, path, allow):
    resp = call(app, method, path)
    assert_error(resp, 405)
    assert resp.headers["allow"] == allow


# --- models / health -----------------------------------------------------------------------------


def test_models_list(app):
    resp = call(app, "GET", "/v1/models")
    assert resp.status == 200 and resp.headers["content-type"] == "application/json"
    data = resp.json()
    assert data["object"] == "list"
    [card] = data["data"]
    assert card["id"] == "fake-model" and card["object"] == "model" and card["owned_by"] == "pyserve"
    assert card["max_model_len"] == 64 and isinstance(card["created"], int)


def test_served_model_name(engine):
    app = create_app(engine, served_model_name="my-name")
    assert call(app, "GET", "/v1/models").json()["data"][0]["id"] == "my-name"
    assert call(app, "GET", "/v1/models/my-name").json()["id"] == "my-name"
    assert_error(call(app, "GET", "/v1/models/fake-model"), 404, param="model", code="model_not_found")


def test_health(app):
    resp = call(app, "GET", "/health")
    assert resp.status == 200 and resp.json() == {"status": "ok"}


# --- request errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("body", [b"{not json", b"[1,2]", b'"s"', b"", b'{"temperature": NaN}', b"\xff"])
def test_malformed_bodies_400(app, engine, path, body):
    assert_error(call(app, "POST", path, body), 400, param=None)
    assert engine.calls == []


def test_missing_messages_and_prompt_name_the_param(app):
    assert_error(call(app, "POST", "/v1/chat/completions", {"model": "fake-model"}), 400, param="messages")
    assert_error(call(app, "POST", "/v1/completions", {"model": "fake-model"}), 400, param="prompt")


@pytest.mark.parametrize(
    "field, value",
    [("temperature", 3), ("temperature", "hot"), ("top_p", 0), ("max_tokens", 0), ("n", 0), ("stop", 7), ("stream", "yes"), ("seed", "x")],
)
def test_bad_params_400(app, engine, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    assert_error(call(app, "POST", "/v1/chat/completions", body), 400, param=field)
    assert engine.calls == []


def test_unknown_model_404(app):
    body = {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}
    err = assert_error(call(app, "POST", "/v1/chat/completions", body), 404, param="model", code="model_not_found")
    assert "gpt-17" in err["message"]
    assert_error(call(app, "POST", "/v1/completions", {"model": "x", "prompt": "hi"}), 404, code="model_not_found")


def test_prompt_too_long_names_both_numbers(app, engine):
    err = assert_error(call(app, "POST", "/v1/completions", {"prompt": "x" * 100}), 400, param="prompt")
    assert "64" in err["message"] and "101" in err["message"]  # 100 bytes + BOS
    assert err["code"] == "context_length_exceeded"
    err = assert_error(
        call(app, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 80}]}),
        400,
        param="messages",
    )
    assert "64" in err["message"]
    assert engine.calls == []


def test_prompt_token_ids_checked_against_vocab(app):
    assert_error(call(app, "POST", "/v1/completions", {"prompt": [1, 2, 5000]}), 400, param="prompt")
    assert_error(call(app, "POST", "/v1/completions", {"prompt": "hi", "stop_token_ids": [999]}), 400, param="stop_token_ids")


def test_empty_prompt_400(app):
    engine = FakeEngine(model=None)
    engine.model.tokenizer.add_bos_token = False
    app = create_app(engine)
    assert_error(call(app, "POST", "/v1/completions", {"prompt": ""}), 400, param="prompt")


def test_chat_template_error_is_400(app):
    body = {"messages": [{"role": "user", "content": "RAISE"}]}
    err = assert_error(call(app, "POST", "/v1/chat/completions", body), 400, param="messages")
    assert "alternate" in err["message"]


def test_unsupported_sampling_feature_is_400_not_ignored(app):
    body = {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}
    # Either the engine's SamplingParams supports it (200) or the request is refused (400).
    resp = call(app, "POST", "/v1/chat/completions", body)
    assert resp.status in (200, 400)
    if resp.status == 400:
        assert_error(resp, 400, param="presence_penalty")


def test_body_too_large_413(engine):
    app = create_app(engine, max_body_bytes=100)
    body = {"prompt": "x" * 200}
    assert_error(call(app, "POST", "/v1/completions", body), 413)
    assert_error(call(app, "POST", "/v1/completions", body, body_chunk=30), 413)
    # Content-Length alone is enough to refuse.
    assert_error(call(app, "POST", "/v1/completions", b"{}", headers=[("content-length", "5000")]), 413)


def test_body_in_pieces(app):
    resp = call(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3}, body_chunk=4)
    assert resp.status == 200


def test_engine_value_error_is_400_other_errors_500(engine, app):
    engine.error = ValueError("seed out of range for this engine")
    err = assert_error(call(app, "POST", "/v1/completions", {"prompt": "hi"}), 400)
    assert "seed" in err["message"]
    engine.error = RuntimeError("kaboom")
    err = assert_error(call(app, "POST", "/v1/completions", {"prompt": "hi"}), 500)
    assert err["type"] == "server_error"


def test_engine_overload_error_keeps_status_and_headers(engine, app):
    engine.error = ProtocolError("Server busy", status=503, type="server_error", headers=[("retry-after", "1")])
    resp = call(app, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert_error(resp, 503)
    assert resp.headers["retry-after"] == "1"


# --- lifespan ------------------------------------------------------------------------------------


def test_lifespan_runs_and_stops_the_engine(engine, app):
    out: list = []
    state: dict = {}

    async def main():
        inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        go = anyio.Event()

        async def receive():
            if len(inbox) == 1:
                await go.wait()
            return inbox.pop(0)

        async def send(message):
            out.append(message)

        async with anyio.create_task_group() as tg:
            tg.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
            with anyio.fail_after(5):
                while not out:
                    await anyio.sleep(0.001)
            state["running_after_startup"] = engine.running
            go.set()

    anyio.run(main)
    assert [m["type"] for m in out] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert state["running_after_startup"] is True
    assert engine.shut_down and not engine.running


def test_lifespan_startup_failure_reported(engine, app):
    async def bad_run(*, task_status=anyio.TASK_STATUS_IGNORED):
        raise RuntimeError("no backend")

    engine.run = bad_run
    out: list = []

    async def main():
        async def receive():
            return {"type": "lifespan.startup"}

        async def send(message):
            out.append(message)

        with anyio.fail_after(5):
            await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    anyio.run(main)
    assert out[0]["type"] == "lifespan.startup.failed" and "no backend" in out[0]["message"]


def test_engine_crash_after_start_makes_health_503(engine, app):
    crash = anyio.Event()

    async def crashing_run(*, task_status=anyio.TASK_STATUS_IGNORED):
        task_status.started()
        await crash.wait()
        raise RuntimeError("worker died")

    engine.run = crashing_run
    results: dict = {}

    async def main():
        from api_fakes import request

        inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        go = anyio.Event()
        out: list = []

        async def receive():
            if len(inbox) == 1:
                await go.wait()
            return inbox.pop(0)

        async def send(message):
            out.append(message)

        async with anyio.create_task_group() as tg:
            tg.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
            with anyio.fail_after(5):
                while not out:
                    await anyio.sleep(0.001)
            crash.set()
            await anyio.sleep(0.01)
            results["health"] = await request(app, "GET", "/health")
            results["chat"] = await request(
                app, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
            )
            go.set()
        results["out"] = out

    anyio.run(main)
    assert results["health"].status == 503
    assert_error(results["chat"], 503)
    assert results["out"][-1]["type"] == "lifespan.shutdown.complete"
