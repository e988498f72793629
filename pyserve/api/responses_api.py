"""`POST /v1/responses`, `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}`: OpenAI's Responses
API over the same generation path as chat completions (pyserve/protocol/responses_api.py reads the
request as a chat request).

Output items: one `message` with an `output_text` part when the reply has text, one
`function_call` item per tool call. Streaming sends the Responses event sequence —
response.created, response.in_progress, then per item output_item.added, content_part.added,
output_text.delta… (or function_call_arguments.delta…), the .done events, and response.completed
(or response.incomplete when max_output_tokens cut it) — each with a sequence_number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyserve.api.asgi import EventStream, Request, run_until_disconnect, send_json
from pyserve.api.generation import ChoiceResult, PromptResult, Sink, run_prompt
from pyserve.api.openai import ServingContext, as_protocol_error, prepare_chat
from pyserve.api.response_store import ResponseStore
from pyserve.api.tools import ToolPlan, ToolStream, tool_message
from pyserve.protocol.errors import ProtocolError
from pyserve.protocol.requests import parse_json_object
from pyserve.protocol.responses_api import (
    ResponsesRequest,
    assistant_message,
    new_id,
    now,
    output_function_call,
    output_message,
    response_object,
    response_usage,
)


def _not_found(response_id: str, param: str | None = None) -> ProtocolError:
    return ProtocolError(f"Response with id '{response_id}' not found.", status=404, param=param,
                         type="invalid_request_error", code="not_found")


@dataclass
class _Reply:
    """The reply's output items as they are built (streamed or whole)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # chat-style tool calls, for the store


def _whole_output(text: str, plan: ToolPlan | None) -> _Reply:
    reply = _Reply()
    content: str | None = text
    calls: list[dict[str, Any]] = []
    if plan is not None:
        content, calls = tool_message(text, plan)
    if content:
        reply.items.append(output_message(content, new_id("msg")))
        reply.content = content
    for call in calls:
        fn = call["function"]
        reply.items.append(output_function_call(call["id"], fn["name"], fn["arguments"], new_id("fc")))
    reply.calls = calls
    return reply


class _EventSink(Sink):
    """One choice's text as Responses stream events."""

    def __init__(self, stream: EventStream, plan: ToolPlan | None) -> None:
        self.stream = stream
        self.tools = ToolStream(plan) if plan is not None else None
        self.reply = _Reply()
        self.seq = 2  # response.created and response.in_progress went first
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.open_index = -1
        self.call_slots: dict[int, dict[str, Any]] = {}  # tool-call delta index -> its item

    async def _send(self, event: dict[str, Any]) -> None:
        event["sequence_number"] = self.seq
        self.seq += 1
        await self.stream.send(event)

    async def _open(self, item: dict[str, Any]) -> None:
        await self._close()
        self.reply.items.append(item)
        self.open, self.open_index = item, len(self.reply.items) - 1
        added = {**item, "status": "in_progress"}
        if item["type"] == "message":
            added["content"] = []  # the part arrives with content_part.added (as OpenAI sends it)
        await self._send({"type": "response.output_item.added", "output_index": self.open_index, "item": added})
        if item["type"] == "message":
            await self._send({"type": "response.content_part.added", "item_id": item["id"],
                              "output_index": self.open_index, "content_index": 0,
                              "part": {"type": "output_text", "text": "", "annotations": []}})

    async def _close(self) -> None:
        item, index = self.open, self.open_index
        if item is None:
            return
        self.open = None
        if item["type"] == "message":
            part = item["content"][0]
            await self._send({"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                              "content_index": 0, "text": part["text"], "logprobs": []})
            await self._send({"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                              "content_index": 0, "part": part})
        else:
            await self._send({"type": "response.function_call_arguments.done", "item_id": item["id"],
                              "output_index": index, "name": item["name"], "arguments": item["arguments"]})
        await self._send({"type": "response.output_item.done", "output_index": index, "item": item})

    async def _text(self, text: str) -> None:
        if not text:
            return
        if self.open is None or self.open["type"] != "message":
            await self._open(output_message("", new_id("msg")))
        assert self.open is not None
        self.open["content"][0]["text"] += text
        self.reply.content += text
        await self._send({"type": "response.output_text.delta", "item_id": self.open["id"],
                          "output_index": self.open_index, "content_index": 0, "delta": text, "logprobs": []})

    async def _call(self, delta: dict[str, Any]) -> None:
        index = int(delta.get("index", 0))
        fn = delta.get("function") or {}
        item = self.call_slots.get(index)
        if item is None:
            item = output_function_call(delta.get("id") or new_id("call"), fn.get("name") or "", "", new_id("fc"))
            self.call_slots[index] = item
            self.reply.calls.append({"id": item["call_id"], "type": "function",
                                     "function": {"name": item["name"], "arguments": ""}})
            await self._open(item)
        pieces = fn.get("arguments") or ""
        if pieces:
            item["arguments"] += pieces
            self.reply.calls[-1]["function"]["arguments"] = item["arguments"]
            await self._send({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                              "output_index": self.open_index, "delta": pieces})

    async def _feed(self, text: str, final: bool = False) -> None:
        if self.tools is None:
            await self._text(text)
            return
        content, calls = self.tools.feed(text, final)
        await self._text(content)
        for c in calls:
            await self._call(c)

    async def delta(self, choice: int, text: str, logprobs: Any) -> None:
        await self._feed(text)

    async def finish(self, choice: int, result: ChoiceResult) -> None:
        await self._feed("", final=True)
        await self._close()


async def create_response(ctx: ServingContext, store: ResponseStore, request: Request) -> None:
    ctx.check_ready()
    data = parse_json_object(await request.body(ctx.max_body_bytes))
    previous = None
    prev_id = data.get("previous_response_id")
    if isinstance(prev_id, str):
        stored = store.get(prev_id)
        if stored is None:
            raise _not_found(prev_id, "previous_response_id")
        previous = stored.conversation
    rr = ResponsesRequest.from_json(data, previous)
    req = rr.chat
    ctx.check_model(req.model)
    job, plan = await prepare_chat(ctx, req, "input")
    prompt_ids = job.prompt_ids
    response_id, created = new_id("resp"), now()

    def finished(result: PromptResult, reply: _Reply) -> dict[str, Any]:
        choice = result.choices[0]
        cut = choice.finish_reason == "length"
        # "abort": the server shut down before the answer was complete.
        status = "incomplete" if cut else "failed" if choice.finish_reason == "abort" else "completed"
        obj = response_object(rr, id=response_id, created_at=created, model=ctx.model_name,
                              status=status, output=reply.items,
                              usage=response_usage(len(prompt_ids), choice.completion_tokens,
                                                   min(result.cached_tokens, len(prompt_ids))),
                              incomplete_reason="max_output_tokens" if cut else None,
                              error={"code": "server_error", "message": "The server stopped before the response was complete."}
                              if status == "failed" else None)
        if rr.store and status != "failed":
            conversation = list(previous or []) + rr.input_messages + [assistant_message(reply.content, reply.calls)]
            store.put(response_id, obj, conversation)
        return obj

    def run(sink: Sink | None = None) -> Any:
        return run_prompt(ctx.engine, prompt_ids, job.params, stops=req.stop, skip_special_tokens=req.skip_special_tokens,
                          sink=sink)

    if not req.stream:
        disconnected, result = await run_until_disconnect(request.receive, run)
        if disconnected or result is None:
            return
        await send_json(request, 200, finished(result, _whole_output(result.choices[0].text, plan)))
        return

    start = response_object(rr, id=response_id, created_at=created, model=ctx.model_name, status="in_progress",
                            output=[], usage=None)
    stream = EventStream(request, on_start=lambda: [
        {"type": "response.created", "sequence_number": 0, "response": start},
        {"type": "response.in_progress", "sequence_number": 1, "response": start},
    ], done_marker=False, named=True)
    sink = _EventSink(stream, plan)

    async def produce() -> None:
        await stream.start()  # response.created goes out now, not with the first token
        result = await run(sink)
        obj = finished(result, sink.reply)
        kind = {"incomplete": "response.incomplete", "failed": "response.failed"}.get(obj["status"], "response.completed")
        await sink._send({"type": kind, "response": obj})
        await stream.close()

    try:
        await run_until_disconnect(request.receive, produce)
    except Exception as exc:
        if not stream.started or stream.closed:
            raise
        if isinstance(exc, OSError):
            return
        # Headers are out: an error event, then the response as failed (what the SDK waits for).
        err = as_protocol_error(exc)
        await sink._send({"type": "error", "code": err.code, "message": err.message, "param": err.param})
        failed = response_object(rr, id=response_id, created_at=created, model=ctx.model_name, status="failed",
                                 output=sink.reply.items, usage=None,
                                 error={"code": "server_error" if err.status >= 500 else "invalid_request",
                                        "message": err.message})
        await sink._send({"type": "response.failed", "response": failed})
        await stream.close()


async def get_response(store: ResponseStore, request: Request) -> None:
    response_id = request.path_params["response_id"]
    stored = store.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    await send_json(request, 200, stored.response)


async def delete_response(store: ResponseStore, request: Request) -> None:
    response_id = request.path_params["response_id"]
    if not store.delete(response_id):
        raise _not_found(response_id)
    await send_json(request, 200, {"id": response_id, "object": "response.deleted", "deleted": True})
