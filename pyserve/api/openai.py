"""OpenAI endpoints: /v1/models, /v1/completions, /v1/chat/completions.

A generation request goes: body -> JSON object -> validated request -> prompt token ids (chat
template for chat) -> length checks -> one job per choice -> engine -> text -> JSON or SSE.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import anyio
import jinja2

from pyserve.api.asgi import (
    DEFAULT_MAX_BODY_BYTES,
    EventStream,
    Request,
    run_until_disconnect,
    send_json,
)
from pyserve.api.generation import (
    ChoiceResult,
    build_sampling_params,
    check_prompt_length,
    check_token_ids,
    run_choice,
)
from pyserve.protocol import responses as R
from pyserve.protocol.errors import SERVER_ERROR, ProtocolError
from pyserve.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_json_object,
)

log = logging.getLogger(__name__)


def as_protocol_error(exc: BaseException) -> ProtocolError:
    """Maps any exception to the error we report. ValueError is the engine's word for "bad
    request" (never a 500 for a client's mistake); anything else is our fault: logged, 500."""
    if isinstance(exc, ProtocolError):
        return exc
    if isinstance(exc, ValueError):
        return ProtocolError(str(exc) or "Invalid request.")
    log.error("internal error while serving a request", exc_info=exc)
    return ProtocolError(
        f"Internal server error ({type(exc).__name__}); see the server log.", status=500, type=SERVER_ERROR
    )


@dataclass
class ServingContext:
    engine: Any
    model_name: str
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    engine_failed: BaseException | None = None

    @property
    def tokenizer(self) -> Any:
        return self.engine.model.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def vocab_size(self) -> int | None:
        config = getattr(self.engine.model, "config", None)
        size = getattr(config, "vocab_size", None) or getattr(self.tokenizer, "vocab_size", None)
        return int(size) if size else None

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return dict(getattr(self.engine.model, "generation_defaults", None) or {})

    def check_ready(self) -> None:
        if self.engine_failed is not None:
            raise ProtocolError(
                "The engine has stopped after an internal error; the server must be restarted.",
                status=503,
                type=SERVER_ERROR,
            )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ProtocolError(
                f"The model '{name}' does not exist. This server serves '{self.model_name}'.",
                status=404,
                param="model",
                code="model_not_found",
            )


# --- /v1/models ---------------------------------------------------------------------------------


async def list_models(ctx: ServingContext, request: Request) -> None:
    await send_json(request, 200, R.model_list([_card(ctx)]))


async def get_model(ctx: ServingContext, request: Request) -> None:
    name = request.path_params["model"]
    ctx.check_model(name)
    await send_json(request, 200, _card(ctx))


def _card(ctx: ServingContext) -> dict[str, Any]:
    return R.model_card(ctx.model_name, _STARTED, ctx.max_model_len, root=getattr(ctx.engine.model, "path", None))


_STARTED = R.now()


# --- generation endpoints -----------------------------------------------------------------------


@dataclass
class _Job:
    index: int  # choice index in the response
    prompt_index: int
    prompt_ids: list[int]
    params: Any


@dataclass
class _Format:
    """What differs between chat and completions: the object shapes."""

    chat: bool
    id: str
    created: int
    model: str
    n_choices: int
    include_usage: bool

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            obj = R.chat_chunk(self.id, self.created, self.model, choices)
        else:
            obj = R.completion(self.id, self.created, self.model, choices, None)
        if self.include_usage:
            obj["usage"] = usage  # OpenAI: null on every chunk but the last
        return obj

    def start_events(self) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        return [self._chunk([R.chat_chunk_choice(i, role="assistant", content="")]) for i in range(self.n_choices)]

    def text_chunk(self, index: int, text: str) -> dict[str, Any]:
        if self.chat:
            return self._chunk([R.chat_chunk_choice(index, content=text)])
        return self._chunk([R.completion_choice(index, text, None)])

    def finish_chunk(self, index: int, finish_reason: str) -> dict[str, Any]:
        if self.chat:
            return self._chunk([R.chat_chunk_choice(index, finish_reason=finish_reason)])
        return self._chunk([R.completion_choice(index, "", finish_reason)])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return self._chunk([], usage)

    def response(self, results: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            choices = [R.chat_choice(i, r.text, r.finish_reason) for i, r in enumerate(results)]
            return R.chat_completion(self.id, self.created, self.model, choices, usage)
        choices = [R.completion_choice(i, r.text, r.finish_reason) for i, r in enumerate(results)]
        return R.completion(self.id, self.created, self.model, choices, usage)


async def chat_completions(ctx: ServingContext, request: Request) -> None:
    ctx.check_ready()
    req = ChatCompletionRequest.from_json(parse_json_object(await request.body(ctx.max_body_bytes)))
    ctx.check_model(req.model)
    prompt_ids = _chat_prompt_ids(ctx, req.messages)
    check_prompt_length(len(prompt_ids), ctx.max_model_len, "messages")
    _check_request_token_ids(ctx, req)
    jobs = [_job(ctx, req, i, 0, prompt_ids) for i in range(req.n)]
    fmt = _Format(True, R.new_id("chatcmpl"), R.now(), ctx.model_name, len(jobs), req.include_usage)
    await _serve(ctx, request, req, jobs, [prompt_ids], fmt)


async def completions(ctx: ServingContext, request: Request) -> None:
    ctx.check_ready()
    req = CompletionRequest.from_json(parse_json_object(await request.body(ctx.max_body_bytes)))
    ctx.check_model(req.model)
    prompts: list[list[int]] = []
    for p in req.prompt:
        if isinstance(p, str):
            # Plain completions get the tokenizer's usual specials (BOS when the model wants one).
            ids = list(ctx.tokenizer.encode(p, add_special_tokens=True))
        else:
            ids = p
            check_token_ids(ids, ctx.vocab_size, "prompt")
        check_prompt_length(len(ids), ctx.max_model_len, "prompt")
        prompts.append(ids)
    _check_request_token_ids(ctx, req)
    jobs = [
        _job(ctx, req, p_i * req.n + j, p_i, ids)  # OpenAI orders choices prompt-major
        for p_i, ids in enumerate(prompts)
        for j in range(req.n)
    ]
    fmt = _Format(False, R.new_id("cmpl"), R.now(), ctx.model_name, len(jobs), req.include_usage)
    await _serve(ctx, request, req, jobs, prompts, fmt)


def _chat_prompt_ids(ctx: ServingContext, messages: list[dict[str, Any]]) -> list[int]:
    try:
        text = ctx.engine.model.chat_template.render(messages, add_generation_prompt=True)
    except (ValueError, jinja2.TemplateError) as e:  # ChatTemplateError is a ValueError
        raise ProtocolError(f"Could not apply the chat template: {e}", param="messages") from None
    # The template writes BOS itself when the model wants one; never add a second (as vLLM does).
    return list(ctx.tokenizer.encode(text, add_special_tokens=False))


def _check_request_token_ids(ctx: ServingContext, req: GenerationRequest) -> None:
    check_token_ids(req.stop_token_ids, ctx.vocab_size, "stop_token_ids")
    check_token_ids(list(req.logit_bias), ctx.vocab_size, "logit_bias")


def _job(ctx: ServingContext, req: GenerationRequest, index: int, prompt_index: int, ids: list[int]) -> _Job:
    params = build_sampling_params(
        req,
        num_prompt_tokens=len(ids),
        max_model_len=ctx.max_model_len,
        defaults=ctx.generation_defaults,
        choice_index=index,
    )
    return _Job(index, prompt_index, ids, params)


def _usage(jobs: list[_Job], prompts: list[list[int]], results: list[ChoiceResult]) -> dict[str, Any]:
    # Each prompt counts once, however many choices it fed (as vLLM counts n > 1).
    cached = [0] * len(prompts)
    for job, res in zip(jobs, results):
        cached[job.prompt_index] = max(cached[job.prompt_index], min(res.cached_tokens, len(job.prompt_ids)))
    return R.usage(
        prompt_tokens=sum(len(p) for p in prompts),
        completion_tokens=sum(r.completion_tokens for r in results),
        cached_tokens=sum(cached),
    )


async def _run_jobs(jobs: list[_Job], on_job: Any) -> None:
    """Runs every job concurrently (one directly, without a task group, in the common case)."""
    if len(jobs) == 1:
        await on_job(jobs[0])
        return
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(on_job, job)


async def _serve(
    ctx: ServingContext,
    request: Request,
    req: GenerationRequest,
    jobs: list[_Job],
    prompts: list[list[int]],
    fmt: _Format,
) -> None:
    results: list[ChoiceResult | None] = [None] * len(jobs)

    def run(job: _Job, on_text: Any = None) -> Any:
        return run_choice(
            ctx.engine,
            job.prompt_ids,
            job.params,
            stops=req.stop,
            skip_special_tokens=req.skip_special_tokens,
            on_text=on_text,
        )

    if not req.stream:

        async def collect_one(job: _Job) -> None:
            results[job.index] = await run(job)

        async def collect() -> None:
            await _run_jobs(jobs, collect_one)

        disconnected, _ = await run_until_disconnect(request.receive, collect)
        if disconnected:
            return  # nobody to answer; the engine requests were aborted on the way out
        done = [r for r in results if r is not None]
        await send_json(request, 200, fmt.response(done, _usage(jobs, prompts, done)))
        return

    stream = EventStream(request, on_start=fmt.start_events)

    async def stream_one(job: _Job) -> None:
        async def on_text(text: str) -> None:
            await stream.send(fmt.text_chunk(job.index, text))

        res = await run(job, on_text)
        results[job.index] = res
        await stream.send(fmt.finish_chunk(job.index, res.finish_reason))

    async def produce() -> None:
        await _run_jobs(jobs, stream_one)
        if req.include_usage:
            done = [r for r in results if r is not None]
            await stream.send(fmt.usage_chunk(_usage(jobs, prompts, done)))
        await stream.close()

    try:
        await run_until_disconnect(request.receive, produce)
    except Exception as exc:
        if not stream.started or stream.closed:
            raise  # still time for a plain HTTP error
        if isinstance(exc, OSError):
            return  # the client is gone (the server's send failed): nothing more to say
        # Headers are out: report in-band, then end the stream properly.
        err = as_protocol_error(exc)
        await stream.send(err.body())
        await stream.close()
