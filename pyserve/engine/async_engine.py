"""AsyncEngine: the event loop's view of the C++ engine.

The C++ engine runs on its own thread. Requests go in through `add_request` (cheap, locked
queue); results come back in batches that the engine announces by writing a byte to one end of a
socket pair. `run()` waits for that socket with anyio, so the event loop never blocks on the engine
and never polls; it then fans the batch out to one memory stream per request.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from pyserve.config import EngineConfig, available_memory_bytes, kv_bytes_per_token, resolve_engine_config
from pyserve.engine.sampling import RequestOutput, SamplingParams, TokenLogprob
from pyserve.model.loader import LoadedModel

log = logging.getLogger(__name__)


def resolve_for(model: LoadedModel, config: EngineConfig) -> EngineConfig:
    """Fills the unset fields of `config` for this model (mode presets, KV capacity from memory)."""
    if config.resolved():
        return config
    mc = model.config
    return resolve_engine_config(
        config,
        context_length=mc.max_position_embeddings,
        kv_bytes_per_token=kv_bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, 4),
        available_bytes=available_memory_bytes(config.device),
    )


class AsyncEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None, *, isa: str = "auto") -> None:
        from pyserve import _C

        if config is None:
            config = EngineConfig()
        if config.device != "cpu":
            raise ValueError(f"device {config.device!r} is not supported by this build (supported: cpu)")
        self.config = resolve_for(model, config)
        self.model = model
        tensors = [(name, r.format, r.data, tuple(r.shape)) for name, r in model.tensors.items()]
        self._c_model = _C.Model(dataclasses.asdict(model.config), tensors, self.config.num_threads, isa)
        # The engine holds its own (packed) copy now; drop ours, which may be 4x the file (GGUF
        # dequantised to float32).
        del tensors
        model.tensors = {}
        self.max_model_len: int = int(self.config.max_single_sequence_length)
        self._notify_r, self._notify_w = socket.socketpair()
        self._notify_r.setblocking(False)
        self._notify_w.setblocking(False)
        eos = sorted(set(model.config.eos_token_ids) | set(model.tokenizer.eos_token_ids))
        self._engine = _C.Engine(
            self._c_model,
            {
                "max_num_seqs": self.config.max_num_sequence,
                "max_batch_tokens": self.config.prefill_chunk_size,
                "page_size": self.config.page_size,
                "kv_capacity_tokens": self.config.kv_cache_tokens,
                "max_model_len": self.max_model_len,
                "eos_token_ids": eos,
                "notify_fd": self._notify_w.fileno(),
            },
        )
        self._streams: dict[int, MemoryObjectSendStream[RequestOutput]] = {}
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def backend(self) -> str:
        return self._c_model.backend

    @property
    def weight_bytes(self) -> int:
        return self._c_model.weight_bytes

    def stats(self) -> dict[str, Any]:
        return dict(self._engine.stats())

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Dispatch loop: start it in a task group; cancel it to stop."""
        task_status.started()
        while True:
            await anyio.wait_readable(self._notify_r)
            self._drain_notifications()
            self._dispatch(self._engine.fetch())

    def _drain_notifications(self) -> None:
        try:
            while self._notify_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _dispatch(self, outputs: list[tuple]) -> None:
        for rid, index, tokens, finished, reason, num_prompt, logprobs, prompt_logprobs in outputs:
            stream = self._streams.get(rid)
            if stream is None:  # the consumer has gone (aborted); nothing to deliver
                continue
            out = RequestOutput(tokens, finished, reason, num_prompt, index=index, request_id=rid)
            if logprobs is not None:
                out.logprobs = [TokenLogprob(t, lp, list(top)) for t, lp, top in logprobs]
            if prompt_logprobs is not None:
                out.prompt_logprobs = [None] + [TokenLogprob(t, lp, list(top)) for t, lp, top in prompt_logprobs]
            try:
                stream.send_nowait(out)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                # The consumer closed its end without leaving generate() yet: its outputs are moot,
                # and one such stream must not take the dispatch loop (everyone's) down with it.
                self._streams.pop(rid, None)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; with params.n > 1 the choices interleave (see
        RequestOutput.index) and the stream ends when all have finished. Leaving early (break,
        cancellation, aclose) aborts the request, and the engine frees its KV pages. Bad input
        raises ValueError before anything is queued."""
        if self._closed:
            raise RuntimeError("the engine is shut down")
        rid = next(self._ids)
        send, receive = anyio.create_memory_object_stream[RequestOutput](math.inf)
        self._engine.add_request(rid, list(prompt_ids), params.to_engine())
        self._streams[rid] = send
        unfinished = max(int(params.n), 1)
        try:
            async with receive:
                async for out in receive:
                    if out.finished:
                        unfinished -= 1
                    yield out
                    if unfinished == 0:
                        return
        finally:
            self._streams.pop(rid, None)
            send.close()
            if unfinished:
                self._engine.abort(rid)

    def abort_choice(self, request_id: int, index: int) -> None:
        """Stops one choice of an n > 1 request (say, a stop string ended it) and frees its pages;
        its stream still receives the choice's final "abort" output."""
        self._engine.abort(request_id, index)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        await anyio.to_thread.run_sync(self._engine.shutdown)
        self._dispatch(self._engine.fetch())
        self._notify_r.close()
        self._notify_w.close()
