"""Fakes for the API tests: a byte-level tokenizer, a chat template, a scripted AsyncEngine, and
a tiny in-process ASGI client (scope/receive/send; no sockets).

The fake engine follows the engine's interface (pyserve/engine/sampling.py): one request per
prompt with SamplingParams.n choices told apart by RequestOutput.index, logprobs aligned with the
new tokens, prompt logprobs once in choice 0's first output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import anyio

from pyserve.engine.sampling import RequestOutput, TokenLogprob
from pyserve.model.vocab_tokenizer import bytes_to_unicode

BOS, EOS, IM_END = 256, 257, 258
SPECIAL = {BOS: "<s>", EOS: "</s>", IM_END: "<|im_end|>"}

_BYTE_CHARS = bytes_to_unicode()


class _FakeBackend:
    """The two `tokenizers.Tokenizer` methods TokenStrings looks at."""

    def to_str(self) -> str:
        return json.dumps({"decoder": {"type": "ByteLevel"}})

    def get_added_tokens_decoder(self) -> dict[int, str]:
        return dict(SPECIAL)


class FakeTokenizer:
    """Byte-level: ids 0..255 are UTF-8 bytes (so multi-byte characters span tokens), plus three
    special tokens that are recognized when written in the text. Pieces are spelled in GPT-2's
    byte alphabet, like a real byte-level BPE vocabulary."""

    vocab_size = 259
    bos_token, eos_token = "<s>", "</s>"
    bos_token_id, eos_token_ids = BOS, [EOS]
    all_special_ids = set(SPECIAL)
    backend = _FakeBackend()

    def __init__(self, add_bos_token: bool = True) -> None:
        self.add_bos_token = add_bos_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = [BOS] if add_special_tokens and self.add_bos_token else []
        i = 0
        while i < len(text):
            for tok, s in SPECIAL.items():
                if text.startswith(s, i):
                    ids.append(tok)
                    i += len(s)
                    break
            else:
                ids.extend(text[i].encode("utf-8"))
                i += 1
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out, run = [], bytearray()
        for tok in ids:
            if tok < 256:
                run.append(tok)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(SPECIAL[tok])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [SPECIAL.get(i) or _BYTE_CHARS.get(i) for i in ids]

    def is_special(self, id: int) -> bool:
        return id in SPECIAL


class FakeChatTemplate:
    """Writes BOS itself (as many real templates do); raises like a template's raise_exception."""

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        if any(m["content"] == "RAISE" for m in messages):
            raise ValueError("Conversation roles must alternate user/assistant")
        text = "<s>" + "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")


@dataclass
class FakeModelConfig:
    vocab_size: int = 259
    max_position_embeddings: int = 64


@dataclass
class FakeModel:
    name: str = "fake-model"
    path: str = "/models/fake-model"
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    chat_template: FakeChatTemplate = field(default_factory=FakeChatTemplate)
    config: FakeModelConfig = field(default_factory=FakeModelConfig)
    generation_defaults: dict = field(default_factory=dict)


@dataclass
class Call:
    prompt_ids: list[int]
    params: Any
    closed_early: bool = False  # the consumer left before the engine finished: an abort
    finished: bool = False
    aborted_choices: list[int] = field(default_factory=list)  # abort_choice() calls


def fake_logprob(token_id: int, position: int, k: int) -> TokenLogprob:
    """The fake engine's logprobs: the chosen token is the most likely (logprob -0.1 x (position +
    1)), followed by the next ids, one nat apart each."""
    lp = -0.1 * (position + 1)
    top = [((token_id + j) % 256 if token_id < 256 else token_id, lp - j) for j in range(k)]
    return TokenLogprob(token_id, lp, top)


class FakeEngine:
    """Scripted AsyncEngine: every choice answers `reply` (or `reply[i]` for choice i, when a list)
    as tokens (UTF-8 bytes; special tokens written in it are theirs), `chunk` tokens per RequestOutput, then EOS with finish_reason "stop";
    max_tokens cuts it with "length". n choices interleave round-robin (`reverse_rounds`: the last
    choice first in every round); prompt logprobs come once, with choice 0's first output."""

    def __init__(
        self,
        reply: str | list[str] = "Hello there!",
        *,
        chunk: int = 1,
        max_model_len: int = 64,
        model: FakeModel | None = None,
    ) -> None:
        self.reply = reply
        self.chunk = chunk
        self.max_model_len = max_model_len
        self.model = model or FakeModel()
        self.calls: list[Call] = []
        self.gate: anyio.Event | None = None  # when set: wait on it after the first output
        self.error: Exception | None = None  # raised at the start of generate
        self.error_after: int | None = None  # raise RuntimeError after this many outputs
        self.cached_tokens = 0
        self.reverse_rounds = False
        self.end_early_after: int | None = None  # end the stream unfinished after this many outputs
        self.running = False
        self.shut_down = False

    def replies(self, choice: int = 0) -> list[int]:
        reply = self.reply if isinstance(self.reply, str) else self.reply[choice % len(self.reply)]
        return self.model.tokenizer.encode(reply, add_special_tokens=False) + [EOS]

    async def generate(self, prompt_ids: list[int], params: Any):
        call = Call(list(prompt_ids), params)
        request_id = len(self.calls)  # the index into self.calls, as abort_choice receives it
        self.calls.append(call)
        n = getattr(params, "n", 1)
        k = getattr(params, "logprobs", None)
        pk = getattr(params, "prompt_logprobs", None)
        try:
            if self.error is not None:
                raise self.error
            tokens = [self.replies(i) for i in range(n)]
            limit = params.max_tokens if params.max_tokens is not None else max(map(len, tokens))
            produced = [0] * n
            done = [False] * n
            outputs = 0
            while not all(done):
                await anyio.sleep(0)
                order = range(n - 1, -1, -1) if self.reverse_rounds else range(n)
                for i in order:
                    if done[i]:
                        continue
                    if i in call.aborted_choices:  # like the real engine: a final "abort" output
                        done[i] = True
                        call.finished = all(done)
                        yield RequestOutput([], True, "abort", len(prompt_ids), index=i, request_id=request_id)
                        if all(done):
                            return
                        continue
                    take = min(self.chunk, len(tokens[i]) - produced[i], limit - produced[i])
                    new = tokens[i][produced[i] : produced[i] + take]
                    start = produced[i]
                    produced[i] += take
                    eos_hit = bool(new) and new[-1] == EOS and not params.ignore_eos
                    stop_hit = eos_hit or any(t in params.stop_token_ids for t in new)
                    done[i] = stop_hit or produced[i] >= min(limit, len(tokens[i]))
                    reason = "stop" if stop_hit else ("length" if done[i] else None)
                    extra: dict[str, Any] = {"index": i, "request_id": request_id}
                    if self.cached_tokens:
                        extra["num_cached_tokens"] = self.cached_tokens
                    if k is not None:
                        extra["logprobs"] = [fake_logprob(t, start + j, k) for j, t in enumerate(new)]
                    if pk is not None and i == 0 and start == 0:
                        extra["prompt_logprobs"] = [None] + [
                            fake_logprob(t, j, pk) for j, t in enumerate(prompt_ids[1:])
                        ]
                    if all(done):
                        call.finished = True
                    yield RequestOutput(new, done[i], reason, len(prompt_ids), **extra)
                    outputs += 1
                    if all(done):
                        return
                    if self.end_early_after is not None and outputs >= self.end_early_after:
                        call.finished = True
                        return
                    if self.error_after is not None and outputs >= self.error_after:
                        raise RuntimeError("engine exploded")
                    if self.gate is not None:
                        await self.gate.wait()
        finally:
            if not call.finished:
                call.closed_early = True  # synchronous, like a real engine's abort

    def abort_choice(self, request_id: int, index: int) -> None:
        self.calls[request_id].aborted_choices.append(index)

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        self.running = True
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            self.running = False

    async def shutdown(self) -> None:
        self.shut_down = True

    def stats(self) -> dict:
        return {"running": 0, "waiting": 0, "kv_capacity_tokens": 1024}


class LifespanDriver:
    """Plays the server's side of an app's ASGI lifespan: startup at once, shutdown when told."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self._inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        self._answered = anyio.Event()
        self._stop = anyio.Event()

    async def run(self, app: Any) -> None:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, self._receive, self._send)

    async def started(self) -> None:
        """Waits for the app's answer to startup."""
        with anyio.fail_after(5):
            await self._answered.wait()

    def stop(self) -> None:
        self._stop.set()

    async def _receive(self) -> dict:
        if len(self._inbox) == 1:
            await self._stop.wait()
        return self._inbox.pop(0)

    async def _send(self, message: dict) -> None:
        self.sent.append(message)
        self._answered.set()


# --- a tiny ASGI client ----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    messages: list[dict]

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """The SSE `data:` payloads, JSON-decoded ("[DONE]" kept as the string)."""
        text = self.body.decode("utf-8")
        assert text.endswith("\n\n"), text[-50:]
        out = []
        for block in text.split("\n\n")[:-1]:
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        return out


async def request(
    app: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: Sequence[tuple[str, str]] = (),
    disconnect_after: int | None = None,
    body_chunk: int | None = None,
) -> Response:
    """Calls the app once. `body`: bytes, or an object sent as JSON. `disconnect_after`: the
    client goes away after that many response body messages (0: right after the request)."""
    raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    pieces = [raw[i : i + body_chunk] for i in range(0, len(raw), body_chunk)] if body_chunk else [raw]
    pieces = pieces or [b""]
    incoming = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)
    ]
    gone = anyio.Event()
    if disconnect_after == 0:
        gone.set()  # the client leaves right after sending its request
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set():
            raise OSError("client disconnected")
        sent.append(message)
        if disconnect_after is not None and sum(m["type"] == "http.response.body" for m in sent) >= disconnect_after:
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }
    with anyio.fail_after(5):
        await app(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) <= 1
    if not starts:
        return Response(0, {}, b"", sent)
    hdrs = {k.decode().lower(): v.decode() for k, v in starts[0]["headers"]}
    body_bytes = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Response(starts[0]["status"], hdrs, body_bytes, sent)


def call(app: Any, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
    return anyio.run(lambda: request(app, method, path, body, **kwargs))
