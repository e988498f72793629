"""OpenAI endpoints: /v1/models, /v1/completions, /v1/chat/completions.

A generation request goes: body -> JSON object -> validated request -> prompt token ids (chat
template for chat) -> length checks -> one engine request per prompt (its n choices share the
prompt's KV pages) -> text and logprobs per choice -> JSON or SSE.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
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
    PromptResult,
    Sink,
    build_sampling_params,
    check_prompt_length,
    check_token_ids,
    prompt_entries,
    run_prompt,
)
from pyserve.api.tools import ToolPlan, ToolStream, chat_messages, plan_tools, tool_message
from pyserve.engine.detokenizer import TokenStrings
from pyserve.engine.errors import EngineError, EngineFailed
from pyserve.engine.grammar import GrammarError
from pyserve.protocol import responses as R
from pyserve.protocol.errors import SERVER_ERROR, ProtocolError
from pyserve.protocol.structured import Constraint
from pyserve.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    OutputLimits,
    parse_debug_config,
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
    if isinstance(exc, EngineFailed):
        return ProtocolError(f"The engine has stopped after an internal error: {exc}", status=503, type=SERVER_ERROR)
    if isinstance(exc, EngineError):  # the engine logged the fault; the other requests go on
        return ProtocolError(f"Internal error in the engine while serving this request: {exc}", status=500,
                             type=SERVER_ERROR)
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
    limits: OutputLimits = field(default_factory=OutputLimits)  # the operator's max_tokens default and cap
    enable_debug: bool = False  # --enable-debug: requests' debug_config is honoured

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

    @functools.cached_property
    def token_strings(self) -> TokenStrings:
        return TokenStrings(self.tokenizer)

    @functools.cached_property
    def encode_limiter(self) -> anyio.CapacityLimiter:
        """One long tokenization at a time off the event loop (2 cores, shared with the engine).
        Made on first use, inside the serving loop."""
        return anyio.CapacityLimiter(1)

    @functools.cached_property
    def compile_limiter(self) -> anyio.CapacityLimiter:
        """One grammar compilation at a time off the event loop (its own queue: a large schema
        does not hold up other requests' tokenization)."""
        return anyio.CapacityLimiter(1)

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
    """One prompt: one engine request whose n choices are response choices first..first+n-1."""

    prompt_index: int
    prompt_ids: list[int]
    params: Any
    first: int  # response index of this prompt's choice 0 (OpenAI orders choices prompt-major)
    echo_text: str | None = None  # completions with echo: the prompt as text
    echo_skip: int = 0  # leading prompt tokens the echo text does not show (a tokenizer-added BOS)


@dataclass
class _Format:
    """What differs between chat and completions: the object shapes."""

    chat: bool
    id: str
    created: int
    model: str
    n_choices: int
    include_usage: bool
    logprobs: bool
    tool_plan: ToolPlan | None = None  # chat with tools: replies are parsed into tool_calls

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            obj = R.chat_chunk(self.id, self.created, self.model, choices)
        else:
            obj = R.completion(self.id, self.created, self.model, choices, None)
        if self.include_usage:
            obj["usage"] = usage  # OpenAI: null on every chunk but the last
        return obj

    def _logprobs(self, entries: list[R.LogprobEntry] | None) -> dict[str, Any] | None:
        if not self.logprobs or entries is None:
            return None
        return R.chat_logprobs(entries) if self.chat else R.completion_logprobs(entries)

    def start_events(self) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        return [self._chunk([R.chat_chunk_choice(i, role="assistant", content="")]) for i in range(self.n_choices)]

    def text_chunk(self, index: int, text: str, entries: list[R.LogprobEntry] | None = None,
                   tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        lp = self._logprobs(entries)
        if self.chat:
            content = text if text or not tool_calls else None
            if tool_calls and self.tool_plan is not None and self.tool_plan.legacy:
                # legacy `functions`: the one call's name and argument pieces as `function_call`
                fn: dict[str, Any] = {}
                for d in tool_calls:
                    if d.get("index", 0) == 0:
                        f = d.get("function") or {}
                        if f.get("name"):
                            fn["name"] = f["name"]
                        fn["arguments"] = fn.get("arguments", "") + (f.get("arguments") or "")
                return self._chunk([R.chat_chunk_choice(index, content=content, logprobs=lp, function_call=fn or None)])
            return self._chunk([R.chat_chunk_choice(index, content=content, logprobs=lp, tool_calls=tool_calls)])
        return self._chunk([R.completion_choice(index, text, None, lp)])

    def finish_chunk(self, index: int, finish_reason: str) -> dict[str, Any]:
        if self.chat:
            return self._chunk([R.chat_chunk_choice(index, finish_reason=finish_reason)])
        return self._chunk([R.completion_choice(index, "", finish_reason)])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return self._chunk([], usage)

    def response(self, choices: list[tuple[str, str, list[R.LogprobEntry] | None]], usage: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            objs = []
            for i, (text, reason, lp) in enumerate(choices):
                if self.tool_plan is None:
                    objs.append(R.chat_choice(i, text, reason, self._logprobs(lp)))
                    continue
                content, calls = tool_message(text, self.tool_plan)
                if self.tool_plan.legacy:
                    fc = calls[0]["function"] if calls else None
                    objs.append(R.chat_choice(i, content, "function_call" if fc and reason == "stop" else reason,
                                              self._logprobs(lp), function_call=fc))
                    continue
                if calls and reason == "stop":
                    reason = "tool_calls"
                objs.append(R.chat_choice(i, content, reason, self._logprobs(lp), calls))
            return R.chat_completion(self.id, self.created, self.model, objs, usage)
        objs = [R.completion_choice(i, text, reason, self._logprobs(lp)) for i, (text, reason, lp) in enumerate(choices)]
        return R.completion(self.id, self.created, self.model, objs, usage)


async def chat_completions(ctx: ServingContext, request: Request) -> None:
    ctx.check_ready()
    req = ChatCompletionRequest.from_json(parse_json_object(await request.body(ctx.max_body_bytes)))
    ctx.check_model(req.model)
    job, plan = await prepare_chat(ctx, req)
    fmt = _Format(True, R.new_id("chatcmpl"), R.now(), ctx.model_name, req.n, req.include_usage,
                  req.logprobs is not None, plan)
    await _serve(ctx, request, req, [job], fmt)


async def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest, prompt_param: str = "messages") -> tuple[_Job, ToolPlan | None]:
    """A chat request made ready to run: its tools planned, its prompt rendered and tokenized and
    checked, its sampling parameters (and grammar, if any) set. Chat and the Responses API share it."""
    template = ctx.engine.model.chat_template
    plan = plan_tools(req, template, ctx.tokenizer)
    messages, extra = chat_messages(req, template)
    prompt_ids = await _chat_prompt_ids(ctx, messages, **extra)
    check_prompt_length(len(prompt_ids), ctx.max_model_len, prompt_param)
    _check_request_token_ids(ctx, req)
    job = _Job(0, prompt_ids, _params(ctx, req, prompt_ids), 0)
    await _constrain(ctx, req.constraint or (plan.constraint if plan else None), [job])
    if plan is not None and plan.keep_special:
        req.skip_special_tokens = False  # a marker the parser needs is a special token
    return job, plan


async def completions(ctx: ServingContext, request: Request) -> None:
    ctx.check_ready()
    req = CompletionRequest.from_json(parse_json_object(await request.body(ctx.max_body_bytes)))
    ctx.check_model(req.model)
    jobs: list[_Job] = []
    for p_i, p in enumerate(req.prompt):
        skip = 0
        if isinstance(p, str):
            # Plain completions get the tokenizer's usual specials (BOS when the model wants one).
            ids = await _encode(ctx, p, add_special_tokens=True)
            if req.echo:
                skip = max(len(ids) - len(await _encode(ctx, p, add_special_tokens=False)), 0)
            echo_text = p
        else:
            ids = p
            check_token_ids(ids, ctx.vocab_size, "prompt")
            echo_text = ctx.tokenizer.decode(ids, skip_special_tokens=False) if req.echo else None
        check_prompt_length(len(ids), ctx.max_model_len, "prompt")
        job = _Job(p_i, ids, None, p_i * req.n, echo_text if req.echo else None, skip)
        jobs.append(job)
    _check_request_token_ids(ctx, req)
    for job in jobs:
        job.params = _params(ctx, req, job.prompt_ids)
    await _constrain(ctx, req.constraint, jobs)
    fmt = _Format(False, R.new_id("cmpl"), R.now(), ctx.model_name, len(jobs) * req.n, req.include_usage, req.logprobs is not None)
    await _serve(ctx, request, req, jobs, fmt)


# Tokenizing a long text takes a while (a megabyte: over a second): off the event loop, so one big
# prompt does not stall every other stream. Short texts are cheaper to do in place.
_ENCODE_IN_THREAD_CHARS = 16_384


async def _encode(ctx: ServingContext, text: str, *, add_special_tokens: bool) -> list[int]:
    if len(text) < _ENCODE_IN_THREAD_CHARS:
        return list(ctx.tokenizer.encode(text, add_special_tokens=add_special_tokens))
    ids = await anyio.to_thread.run_sync(
        functools.partial(ctx.tokenizer.encode, text, add_special_tokens=add_special_tokens), limiter=ctx.encode_limiter
    )
    return list(ids)


async def _chat_prompt_ids(ctx: ServingContext, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
    try:
        text = ctx.engine.model.chat_template.render(messages, add_generation_prompt=True, **extra)
    except (ValueError, jinja2.TemplateError) as e:  # ChatTemplateError is a ValueError
        raise ProtocolError(f"Could not apply the chat template: {e}", param="messages") from None
    # The template writes BOS itself when the model wants one; never add a second (as vLLM does).
    return await _encode(ctx, text, add_special_tokens=False)


def _check_request_token_ids(ctx: ServingContext, req: GenerationRequest) -> None:
    check_token_ids(req.stop_token_ids, ctx.vocab_size, "stop_token_ids")
    check_token_ids(list(req.logit_bias), ctx.vocab_size, "logit_bias")


def _params(ctx: ServingContext, req: GenerationRequest, ids: list[int]) -> Any:
    params = build_sampling_params(
        req, num_prompt_tokens=len(ids), max_model_len=ctx.max_model_len, defaults=ctx.generation_defaults,
        limits=ctx.limits,
    )
    if ctx.enable_debug and req.debug_config is not None:  # without --enable-debug: ignored, as MLC
        debug = parse_debug_config(req.debug_config)
        params.ignore_eos = params.ignore_eos or debug.ignore_eos
        params.pin_prompt = debug.pinned_system_prompt
    return params


async def _compile(ctx: ServingContext, constraint: Constraint) -> Any:
    """The constraint's compiled grammar: from the cache, else compiled off the event loop (a
    large schema takes a while). A constraint that does not compile is the client's 400."""
    compiler = getattr(ctx.engine, "grammars", None)
    if compiler is None:
        raise ProtocolError("Structured output is not available with this engine.", param=constraint.param)
    try:
        hit = compiler.cached(constraint)
        if hit is not None:
            return hit
        return await anyio.to_thread.run_sync(compiler.compile, constraint, limiter=ctx.compile_limiter)
    except GrammarError as e:
        raise ProtocolError(f"Invalid '{constraint.param}': {e}", param=constraint.param) from None


async def _constrain(ctx: ServingContext, constraint: Constraint | None, jobs: list[_Job]) -> None:
    if constraint is None:
        return
    grammar = await _compile(ctx, constraint)
    for job in jobs:
        job.params.grammar = grammar


def _usage(jobs: list[_Job], results: list[PromptResult]) -> dict[str, Any]:
    # Each prompt counts once, however many choices it fed (as vLLM counts n > 1).
    return R.usage(
        prompt_tokens=sum(len(j.prompt_ids) for j in jobs),
        completion_tokens=sum(c.completion_tokens for r in results for c in r.choices),
        cached_tokens=sum(min(r.cached_tokens, len(j.prompt_ids)) for j, r in zip(jobs, results)),
    )


def _shift(entries: list[R.LogprobEntry] | None, by: int, limit: int) -> list[R.LogprobEntry] | None:
    """Generated tokens' text offsets, moved behind the echoed prompt and clamped to the text (a
    stop string cuts the text after the tokens that spelled it)."""
    if entries is None:
        return None
    return [replace(e, text_offset=by + min(e.text_offset, limit)) for e in entries]


async def _run_jobs(jobs: list[_Job], on_job: Any) -> None:
    """Runs every job concurrently (one directly, without a task group, in the common case)."""
    if len(jobs) == 1:
        await on_job(jobs[0])
        return
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(on_job, job)


class _StreamSink(Sink):
    """Streams one prompt's choices as SSE chunks."""

    def __init__(self, stream: EventStream, fmt: _Format, ctx: ServingContext, job: _Job) -> None:
        self.stream, self.fmt, self.ctx, self.job = stream, fmt, ctx, job
        self.echo_len = len(job.echo_text) if job.echo_text is not None else 0
        self.tool_streams: dict[int, ToolStream] = {}

    async def start(self, choice: int, prompt_logprobs: list[R.LogprobEntry] | None) -> None:
        if self.job.echo_text is not None:
            await self.stream.send(self.fmt.text_chunk(self.job.first + choice, self.job.echo_text, prompt_logprobs))

    async def delta(self, choice: int, text: str, logprobs: list[R.LogprobEntry] | None) -> None:
        if self.echo_len and logprobs:
            logprobs = [replace(e, text_offset=e.text_offset + self.echo_len) for e in logprobs]
        if self.fmt.tool_plan is not None:
            await self._tool_delta(choice, text, logprobs)
            return
        await self.stream.send(self.fmt.text_chunk(self.job.first + choice, text, logprobs))

    async def _tool_delta(self, choice: int, text: str, logprobs: list[R.LogprobEntry] | None,
                          final: bool = False) -> None:
        assert self.fmt.tool_plan is not None
        ts = self.tool_streams.setdefault(choice, ToolStream(self.fmt.tool_plan))
        content, calls = ts.feed(text, final)
        if content or calls or logprobs:
            await self.stream.send(self.fmt.text_chunk(self.job.first + choice, content, logprobs, calls))

    async def finish(self, choice: int, result: ChoiceResult) -> None:
        reason = result.finish_reason
        if self.fmt.tool_plan is not None:
            await self._tool_delta(choice, "", None, final=True)
            if self.tool_streams[choice].called and reason == "stop":
                reason = "function_call" if self.fmt.tool_plan.legacy else "tool_calls"
        await self.stream.send(self.fmt.finish_chunk(self.job.first + choice, reason))


async def _serve(
    ctx: ServingContext,
    request: Request,
    req: GenerationRequest,
    jobs: list[_Job],
    fmt: _Format,
) -> None:
    results: list[PromptResult | None] = [None] * len(jobs)
    want_logprobs = req.logprobs is not None
    echo_only = req.echo and req.max_tokens == 0

    def run(job: _Job, sink: Sink | None = None) -> Any:
        entries = None
        if job.echo_text is not None and want_logprobs:
            entries = functools.partial(
                prompt_entries, ctx.tokenizer, ctx.token_strings, job.prompt_ids, skip=job.echo_skip
            )
        return run_prompt(
            ctx.engine,
            job.prompt_ids,
            job.params,
            n=req.n,
            stops=req.stop,
            skip_special_tokens=req.skip_special_tokens,
            logprobs=want_logprobs,
            echo_only=echo_only,
            strings=ctx.token_strings if want_logprobs else None,
            prompt_logprob_entries=entries,
            sink=sink,
        )

    if not req.stream:

        async def collect_one(job: _Job) -> None:
            results[job.prompt_index] = await run(job)

        async def collect() -> None:
            await _run_jobs(jobs, collect_one)

        disconnected, _ = await run_until_disconnect(request.receive, collect)
        if disconnected:
            return  # nobody to answer; the engine requests were aborted on the way out
        done = [r for r in results if r is not None]
        choices: list[tuple[str, str, list[R.LogprobEntry] | None]] = []
        for job, res in zip(jobs, done):
            for c in res.choices:
                if job.echo_text is None:
                    choices.append((c.text, c.finish_reason, c.logprobs))
                    continue
                gen = _shift(c.logprobs, len(job.echo_text), len(c.text))
                lps = None if gen is None else (res.prompt_logprobs or []) + gen
                choices.append((job.echo_text + c.text, c.finish_reason, lps))
        await send_json(request, 200, fmt.response(choices, _usage(jobs, done)))
        return

    stream = EventStream(request, on_start=fmt.start_events)

    async def stream_one(job: _Job) -> None:
        results[job.prompt_index] = await run(job, _StreamSink(stream, fmt, ctx, job))

    async def produce() -> None:
        await _run_jobs(jobs, stream_one)
        if req.include_usage:
            done = [r for r in results if r is not None]
            await stream.send(fmt.usage_chunk(_usage(jobs, done)))
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
