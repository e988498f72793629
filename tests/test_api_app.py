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
    assert e.value.status == 405 and e.value.headers == [("allow", "GET, HEAD, POST")]
    assert r.match("HEAD", "/a") == (h, {})  # HEAD is served by GET


def test_unknown_path_404(app):
    err = assert_error(call(app, "GET", "/v1/nope"), 404, param=None)
    assert "/v1/nope" in err["message"]


@pytest.mark.parametrize("method, path, allow", [("GET", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET, HEAD"), ("DELETE", "/health", "GET, HEAD")])
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
    from api_fakes import LifespanDriver

    lifespan = LifespanDriver()
    state: dict = {}
    out: list = []

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(lifespan.run, app)
            await lifespan.started()
            state["running_after_startup"] = engine.running
            lifespan.stop()
        out.extend(lifespan.sent)

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
        from api_fakes import LifespanDriver, request

        lifespan = LifespanDriver()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lifespan.run, app)
            await lifespan.started()
            crash.set()
            await anyio.wait_all_tasks_blocked()  # the engine task has died and the app noticed
            results["health"] = await request(app, "GET", "/health")
            results["chat"] = await request(
                app, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
            )
            lifespan.stop()
        results["out"] = lifespan.sent

    anyio.run(main)
    assert results["health"].status == 503
    assert_error(results["chat"], 503)
    assert results["out"][-1]["type"] == "lifespan.shutdown.complete"


# --- API key ---------------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize(
    "headers, ok",
    [
        ([], False),
        ([("authorization", "Bearer wrong")], False),
        ([("authorization", "Bearer sk-tes")], False),  # a prefix of the key
        ([("authorization", "Bearer sk-test-extra")], False),
        ([("authorization", "Basic sk-test")], False),
        ([("authorization", "Bearer")], False),
        ([("authorization", "sk-test")], False),
        ([("authorization", "Bearer sk-test")], True),
        ([("authorization", "bearer sk-test")], True),  # the scheme is case-insensitive
    ],
)
def test_api_key_guards_v1(engine, headers, ok):
    app = create_app(engine, api_key="sk-test")
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT),
                               ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                               ("GET", "/v1/no-such-route", None)]:
        resp = call(app, method, path, body, headers=headers)
        if ok:
            assert resp.status in (200, 404), resp.body
        else:
            err = assert_error(resp, 401, code="invalid_api_key")
            assert err["type"] == "invalid_request_error"
            assert resp.headers["www-authenticate"] == "Bearer"
    if not ok:
        assert engine.calls == []  # nothing reached the engine


def test_api_key_leaves_health_and_metrics_open(engine):
    app = create_app(engine, api_key="sk-test")
    assert call(app, "GET", "/health").status == 200
    assert call(app, "GET", "/metrics").status == 200


def test_api_key_compare_is_constant_time():
    import inspect

    from pyserve.api import auth

    assert "hmac.compare_digest" in inspect.getsource(auth.APIKeyAuth.check)
    with pytest.raises(ValueError):
        auth.APIKeyAuth("")


# --- CORS ---------------------------------------------------------------------------------------

ORIGIN = ("origin", "https://app.example")


def preflight(app, method="POST", headers="authorization, content-type", origin="https://app.example", path="/v1/chat/completions"):
    hdrs = [("origin", origin), ("access-control-request-method", method)]
    if headers:
        hdrs.append(("access-control-request-headers", headers))
    return call(app, "OPTIONS", path, headers=hdrs)


def test_cors_defaults_are_permissive_like_mlc(engine):
    app = create_app(engine, api_key="sk-test")  # a preflight never carries the key: still 204
    resp = preflight(app)
    assert resp.status == 204 and resp.body == b""
    assert resp.headers["access-control-allow-origin"] == "*"
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert resp.headers["access-control-allow-headers"] == "authorization, content-type"
    assert int(resp.headers["access-control-max-age"]) > 0
    assert "access-control-allow-credentials" not in resp.headers
    # Normal responses, errors included, carry the origin header so browser code can read them.
    ok = call(app, "GET", "/v1/models", headers=[ORIGIN, ("authorization", "Bearer sk-test")])
    assert ok.status == 200 and ok.headers["access-control-allow-origin"] == "*"
    denied = call(app, "GET", "/v1/models", headers=[ORIGIN])
    assert denied.status == 401 and denied.headers["access-control-allow-origin"] == "*"
    streamed = call(app, "POST", "/v1/chat/completions", {**CHAT, "stream": True},
                    headers=[ORIGIN, ("authorization", "Bearer sk-test")])
    assert streamed.status == 200 and streamed.headers["access-control-allow-origin"] == "*"
    # No Origin: no CORS headers at all.
    assert "access-control-allow-origin" not in call(app, "GET", "/health").headers


def test_cors_explicit_origins_methods_headers_credentials(engine):
    from pyserve.api.cors import CORSConfig

    cfg = CORSConfig(allow_origins=["https://app.example"], allow_methods=["GET", "POST"],
                     allow_headers=["Authorization"], allow_credentials=True)
    app = create_app(engine, cors=cfg)
    resp = preflight(app, headers="authorization")
    assert resp.status == 204
    assert resp.headers["access-control-allow-origin"] == "https://app.example"
    assert resp.headers["access-control-allow-credentials"] == "true"
    assert resp.headers["vary"] == "Origin"
    assert resp.headers["access-control-allow-methods"] == "GET, POST"
    assert preflight(app, origin="https://evil.example").status == 400
    assert preflight(app, method="DELETE").status == 400
    assert preflight(app, headers="x-custom").status == 400
    assert preflight(app, headers="content-type").status == 204  # safelisted
    ok = call(app, "GET", "/v1/models", headers=[ORIGIN])
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert ok.headers["access-control-allow-credentials"] == "true"
    other = call(app, "GET", "/v1/models", headers=[("origin", "https://evil.example")])
    assert other.status == 200 and "access-control-allow-origin" not in other.headers


def test_cors_wildcard_with_credentials_echoes_the_origin(engine):
    from pyserve.api.cors import CORSConfig

    app = create_app(engine, cors=CORSConfig(allow_credentials=True))
    resp = call(app, "GET", "/v1/models", headers=[ORIGIN])
    assert resp.headers["access-control-allow-origin"] == "https://app.example"  # never "*" here
    assert resp.headers["vary"] == "Origin"


def test_cors_off(engine):
    from pyserve.api.cors import CORSConfig

    app = create_app(engine, cors=CORSConfig(allow_origins=[]))
    resp = preflight(app)
    assert_error(resp, 405)  # a plain OPTIONS request: no such method on the route
    assert "access-control-allow-origin" not in call(app, "GET", "/v1/models", headers=[ORIGIN]).headers


# --- admission: max waiting requests -------------------------------------------------------------


def test_overload_is_503_with_retry_after_and_recovers(engine):
    app = create_app(engine, max_waiting_requests=2)  # FakeEngine has no batch slots: 2 in flight
    engine.gate = anyio.Event()
    results: dict = {}

    async def main():
        from api_fakes import request

        async with anyio.create_task_group() as tg:
            async def hold(i):
                results[i] = await request(app, "POST", "/v1/chat/completions", {**CHAT, "stream": True})

            for i in range(2):
                tg.start_soon(hold, i)
            await anyio.wait_all_tasks_blocked()  # both holders are parked at the engine's gate
            assert len(engine.calls) == 2
            assert app.pending_requests == 2
            results["over"] = await request(app, "POST", "/v1/completions", {"prompt": "hi"})
            results["models"] = await request(app, "GET", "/v1/models")  # not a generation: served
            engine.gate.set()
        results["after"] = await request(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})

    anyio.run(main)
    err = assert_error(results["over"], 503)
    assert err["type"] == "overloaded_error"
    assert results["over"].headers["retry-after"] == "1"
    assert results["models"].status == 200
    assert results[0].status == results[1].status == 200
    assert results["after"].status == 200 and app.pending_requests == 0
    assert len(engine.calls) == 3  # the refused request never reached the engine
    assert "pyserve:request_rejected_total" in call(app, "GET", "/metrics").body.decode()


def test_overload_limit_counts_the_engine_batch_slots(engine):
    import types

    engine.config = types.SimpleNamespace(max_num_sequence=3)
    app = create_app(engine, max_waiting_requests=0)
    app._pending = 2
    assert call(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status == 200
    app._pending = 3
    assert_error(call(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}), 503)


# --- /metrics ------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_prometheus_text_with_engine_stats_and_request_histograms(engine):
    engine.stats = lambda: {"num_running": 2, "num_waiting": 5, "kv_pages_used": 30, "kv_pages_total": 120,
                            "prompt_tokens_computed": 77, "tokens_generated": 9, "preemptions": 1, "steps": 4}
    app = create_app(engine, served_model_name="m")
    assert call(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3}).status == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert call(app, "POST", "/v1/chat/completions", chat).status == 200
    resp = call(app, "GET", "/metrics")
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = resp.body.decode()
    for name, kind in [("pyserve:num_requests_running", "gauge"), ("pyserve:num_requests_waiting", "gauge"),
                       ("pyserve:kv_cache_usage_perc", "gauge"), ("pyserve:kv_pages_used", "gauge"),
                       ("pyserve:kv_pages_total", "gauge"), ("pyserve:prompt_tokens_total", "counter"),
                       ("pyserve:generation_tokens_total", "counter"), ("pyserve:request_success_total", "counter"),
                       ("pyserve:time_to_first_token_seconds", "histogram"),
                       ("pyserve:e2e_request_latency_seconds", "histogram"),
                       ("pyserve:inter_token_latency_seconds", "histogram")]:
        assert f"# TYPE {name} {kind}\n" in text and f"# HELP {name} " in text
    m = parse_metrics(text)
    lbl = '{model_name="m"}'
    assert m["pyserve:num_requests_running" + lbl] == 2 and m["pyserve:num_requests_waiting" + lbl] == 5
    assert m["pyserve:kv_cache_usage_perc" + lbl] == 0.25
    assert (m["pyserve:kv_pages_used" + lbl], m["pyserve:kv_pages_total" + lbl]) == (30, 120)
    assert (m["pyserve:prompt_tokens_total" + lbl], m["pyserve:generation_tokens_total" + lbl]) == (77, 9)
    assert m['pyserve:request_success_total{model_name="m",finished_reason="length"}'] == 1
    assert m['pyserve:request_success_total{model_name="m",finished_reason="stop"}'] == 1
    assert m["pyserve:time_to_first_token_seconds_count" + lbl] == 2
    assert m['pyserve:time_to_first_token_seconds_bucket{model_name="m",le="+Inf"}'] == 2
    assert m["pyserve:e2e_request_latency_seconds_count" + lbl] == 2
    # "Hello there!" + EOS streamed one token per output: 13 tokens, 12 gaps; 3 tokens: 2 gaps.
    assert m["pyserve:inter_token_latency_seconds_count" + lbl] == 12 + 2
    assert m["pyserve:request_generation_tokens_sum" + lbl] == 13 + 3
    buckets = [v for k, v in m.items() if k.startswith("pyserve:time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative


def test_metrics_count_aborts_and_survive_a_failing_stats(engine):
    def broken():
        raise RuntimeError("engine gone")

    engine.stats = broken
    app = create_app(engine)
    resp = call(app, "POST", "/v1/chat/completions", {**CHAT, "stream": True}, disconnect_after=2)
    assert engine.calls[0].closed_early
    m = parse_metrics(call(app, "GET", "/metrics").body.decode())
    assert m['pyserve:request_success_total{model_name="fake-model",finished_reason="abort"}'] == 1
    assert not any(k.startswith("pyserve:num_requests_running") for k in m)  # unknown, not made up
    assert resp.status == 200


def test_requests_the_engine_refuses_are_not_counted_as_served(engine):
    app = create_app(engine)
    engine.error = ValueError("bad seed")
    assert call(app, "POST", "/v1/completions", {"prompt": "hi"}).status == 400
    text = call(app, "GET", "/metrics").body.decode()
    assert "finished_reason" not in text and 'pyserve:e2e_request_latency_seconds_count{model_name="fake-model"} 0' in text


def test_metric_text_escaping_and_buckets():
    from pyserve.api.metrics import Counter, Histogram, token_buckets

    c = Counter("x_total", "help", {"model_name": 'a"b\\c\nd'})
    c.inc(2)
    assert c.render()[-1] == 'pyserve:x_total{model_name="a\\"b\\\\c\\nd"} 2'
    h = Histogram("h", "help", {}, (1.0, 2.0))
    h.observe(0.5)
    h.observe(1.5, count=2)
    h.observe(9)
    assert h.render()[2:] == ['pyserve:h_bucket{le="1"} 1', 'pyserve:h_bucket{le="2"} 3',
                              'pyserve:h_bucket{le="+Inf"} 4', "pyserve:h_sum 12.5", "pyserve:h_count 4"]
    assert token_buckets(100) == (1, 2, 5, 10, 20, 50, 100)


# --- access-log fields, mounting, engine loop without lifespan ----------------------------------


def asgi_call(app, scope_extra: dict, method: str, path: str, body: bytes = b"") -> tuple[dict, list]:
    sent: list = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [], **scope_extra}

    async def main():
        with anyio.fail_after(5):
            await app(scope, receive, send)

    anyio.run(main)
    return scope, sent


def test_access_log_fields_carry_token_counts(engine):
    import json

    app = create_app(engine)
    scope, sent = asgi_call(app, {"extensions": {"pyserve.access_log": {}}}, "POST", "/v1/completions",
                            json.dumps({"prompt": "hi", "max_tokens": 4}).encode())
    assert sent[0]["status"] == 200
    assert scope["extensions"]["pyserve.access_log"] == {"prompt_tokens": 3, "completion_tokens": 4}  # BOS+"hi"
    scope, _ = asgi_call(app, {"extensions": {"pyserve.access_log": {}}}, "GET", "/v1/models")
    assert scope["extensions"]["pyserve.access_log"] == {}  # no tokens to speak of
    asgi_call(app, {}, "POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 1}')  # no extension: fine


def test_mounted_under_a_root_path(engine):
    app = create_app(engine)
    _, sent = asgi_call(app, {"root_path": "/llm"}, "GET", "/llm/v1/models")
    assert sent[0]["status"] == 200
    _, sent = asgi_call(app, {"root_path": "/llm"}, "GET", "/llm/health")
    assert sent[0]["status"] == 200
    _, sent = asgi_call(app, {"root_path": "/llm"}, "GET", "/llmx/health")
    assert sent[0]["status"] == 404


def test_engine_loop_starts_on_first_request_without_lifespan(engine):
    app = create_app(engine)
    seen: dict = {}
    real_generate = engine.generate

    async def generate(prompt_ids, params):
        seen["running"] = engine.running  # the loop was started before the request reached it
        async for out in real_generate(prompt_ids, params):
            yield out

    engine.generate = generate
    resp = call(app, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert resp.status == 200 and seen["running"] is True
