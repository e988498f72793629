"""AsyncEngine: the event loop's view of the C++ engine.

The C++ engine runs on its own thread. Requests go in through `add_request` (cheap, locked
queue); results come back in batches that the engine announces by writing a byte to one end of a
socket pair. `run()` waits for that socket with anyio, so the event loop never blocks on the engine
and never polls; it then hands each output to its request's mailbox.

Every choice of every request ends exactly once, whatever happens: the engine ends it (stop,
length, abort, or "error" for a fault of ours, which `generate()` raises as EngineError); and if
the engine fails as a whole or shuts down, this side ends whatever it had not ended yet.

Output memory per request is bounded: a mailbox holds at most one pending output per choice, and
merges later ones into it while the consumer is not reading. A client that stops reading holds up
only its own HTTP response; the server drops it after --write-timeout, and leaving generate()
aborts the request (freeing its KV pages). So the backlog is at most the tokens generated in that
time, and never more than the request's max_tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio

from pyserve.config import (EngineConfig, device_kind, resolve_device, resolve_for_model,
                            with_attention_overrides)
from pyserve.engine.errors import EngineError, EngineFailed
from pyserve.engine.grammar import GrammarCompiler
from pyserve.engine.native import (draft_model, eagle_draft, eagle_spec, engine_options, measure_draft_cost,
                                   measure_medusa_cost, measure_token_cost, medusa_heads, medusa_spec, native_model)
from pyserve.engine.sampling import RequestOutput, SamplingParams, TokenLogprob
from pyserve.model.loader import LoadedModel

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineError", "EngineFailed"]


class _Mailbox:
    """One request's outputs on their way to generate(): at most one pending output per choice."""

    __slots__ = ("pending", "open", "_ready")

    def __init__(self, n: int) -> None:
        self.pending: dict[int, RequestOutput] = {}
        self.open = set(range(n))  # choices not ended yet
        self._ready = anyio.Event()

    def put(self, out: RequestOutput) -> None:
        if out.index not in self.open:
            return  # a second end of one choice is dropped: consumers see exactly one
        if out.finished:
            self.open.discard(out.index)
        held = self.pending.get(out.index)
        if held is None:
            self.pending[out.index] = out
        else:
            held.merge(out)
        self._ready.set()

    def end_open(self, reason: str, error: str | None) -> None:
        for index in sorted(self.open):
            self.put(RequestOutput([], True, reason, 0, index=index, error=error))

    async def take(self) -> list[RequestOutput]:
        while not self.pending:
            await self._ready.wait()
            self._ready = anyio.Event()
        outs = list(self.pending.values())
        self.pending.clear()
        return outs


def _path_bytes(path: str) -> int:
    """Bytes of a model file, or of every file in a model directory (0 where unreadable)."""
    try:
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        return os.path.getsize(path)
    except OSError:
        return 0


class AsyncEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None, *, isa: str = "auto") -> None:
        from pyserve import _C

        if config is None:
            config = EngineConfig()
        devices = tuple(_C.devices())
        config = dataclasses.replace(config, device=resolve_device(config.device, devices))
        if device_kind(config.device) not in devices:
            raise ValueError(f"device {config.device!r} is not supported by this build "
                             f"(supported: {', '.join(devices)})")
        if device_kind(config.device) != "cpu" and config.speculative_mode in ("eagle", "medusa"):
            raise ValueError(f"speculative_mode {config.speculative_mode} runs on the CPU only for now "
                             f"(device {config.device}): use ngram or small_draft there")
        model.config = with_attention_overrides(model.config, config)
        # On a GPU the weights take device memory before the KV cache does (a small_draft's too).
        weight_bytes = model.file_bytes
        if config.speculative_mode == "small_draft" and config.additional_models:
            weight_bytes += _path_bytes(config.additional_models[0])
        self.config = resolve_for_model(config, model.config, weight_bytes=weight_bytes)
        self.model = model
        # Medusa heads read the target's LM head rows: taken before its tensors are released.
        mode = self.config.speculative_mode
        medusa = medusa_spec(model, self.config.additional_models[0]) if mode == "medusa" else None
        eagle = eagle_spec(model, self.config.additional_models[0]) if mode == "eagle" else None
        self._c_model = native_model(model, self.config.num_threads, isa, release_tensors=True,
                                     device=self.config.device)
        self.max_model_len: int = int(self.config.max_single_sequence_length)
        self._notify_r, self._notify_w = socket.socketpair()
        self._notify_r.setblocking(False)
        self._notify_w.setblocking(False)
        options = engine_options(model, self.config, self.max_model_len)
        if self.config.speculative_mode == "small_draft":
            options["draft_model"] = draft_model(model, self.config, isa)
        if medusa is not None:
            options["medusa"] = medusa_heads(self._c_model, medusa)
        if eagle is not None:
            options["draft_model"], options["eagle"] = eagle_draft(self._c_model, eagle, self.config.num_threads, isa)
            options["draft_vocab"] = eagle.draft_vocab
        if self.config.speculative_mode != "disable" and not self.config.spec_draft_length:
            options["spec_token_cost"] = measure_token_cost(self._c_model)
            log.info("speculative decoding: one more token costs %.2f of a one-token step here",
                     options["spec_token_cost"])
            if mode in ("small_draft", "eagle"):
                options["spec_draft_cost"] = measure_draft_cost(self._c_model, options["draft_model"])
                log.info("%s: one draft costs %.2f of a one-token step", mode, options["spec_draft_cost"])
            if medusa is not None:
                options["spec_draft_cost"] = measure_medusa_cost(self._c_model, options["medusa"])
                log.info("medusa: one draft costs %.2f of a one-token step", options["spec_draft_cost"])
        options["notify_fd"] = self._notify_w.fileno()  # the engine keeps its own dup
        self._engine = _C.Engine(self._c_model, options)
        # Structured output: constraints compiled against this model's vocabulary, cached.
        self.grammars = GrammarCompiler(model.tokenizer, model.config.vocab_size, model.eos_token_ids)
        self._live: dict[int, _Mailbox] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._running = False
        self.failure: str | None = None  # why the engine stopped working, once it has

    @property
    def backend(self) -> str:
        return self._c_model.backend

    @property
    def weight_bytes(self) -> int:
        return self._c_model.weight_bytes

    def stats(self) -> dict[str, Any]:
        return dict(self._engine.stats())

    def reset(self) -> None:
        """Ends every request (finish_reason "abort") and empties the prefix cache (MLC's
        reset_engine); takes effect at the engine thread's next step."""
        self._engine.reset()

    def trace(self) -> list[tuple]:
        """The engine's event trace with --enable-tracing: [(name, ph, ts_us, dur_us, tid, args)]."""
        return self._engine.trace()

    def inject_fault(self, phase: str, at_step: int = 0, request_id: int = -1, alloc: bool = False,
                     times: int = 1) -> None:
        """Test-only: makes an engine phase throw (see csrc/engine/fault_switch.h)."""
        self._engine.inject_fault(phase, at_step, request_id, alloc, times)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Dispatch loop: start it in a task group; it returns after shutdown() and raises
        EngineFailed if the engine fails (every live request has then ended with an error)."""
        self._running = True
        task_status.started()
        try:
            while not self._closed:
                await anyio.wait_readable(self._notify_r)
                self._drain_notifications()
                self._dispatch(self._engine.fetch())
                failure = self._engine.failure
                if failure is not None:
                    self._fail(failure)
                    raise EngineFailed(failure)
        finally:
            self._running = False
            if self._closed:
                self._close_notify()

    def _drain_notifications(self) -> None:
        try:
            while self._notify_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _dispatch(self, outputs: list[tuple]) -> None:
        for rid, index, tokens, finished, reason, num_prompt, logprobs, prompt_logprobs, error, cached in outputs:
            box = self._live.get(rid)
            if box is None:  # the consumer has gone (aborted); nothing to deliver
                continue
            out = RequestOutput(tokens, finished, reason, num_prompt, index=index, request_id=rid, error=error,
                                num_cached_tokens=cached)
            if logprobs is not None:
                out.logprobs = [TokenLogprob(t, lp, list(top)) for t, lp, top in logprobs]
            if prompt_logprobs is not None:
                out.prompt_logprobs = [None] + [TokenLogprob(t, lp, list(top)) for t, lp, top in prompt_logprobs]
            box.put(out)

    def _fail(self, failure: str) -> None:
        if self.failure is None:
            self.failure = failure
            log.critical("the engine has failed: %s; ending %d live request(s) with an error",
                         failure, len(self._live))
        for box in self._live.values():
            box.end_open("error", f"the engine failed: {failure}")

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; with params.n > 1 the choices interleave (see
        RequestOutput.index) and the stream ends when all have finished. Leaving early (break,
        cancellation, aclose) aborts the request, and the engine frees its KV pages. Bad input
        raises ValueError before anything is queued; a fault of ours raises EngineError (and
        EngineFailed once the engine cannot go on)."""
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if self._closed:
            raise RuntimeError("the engine is shut down")
        rid = next(self._ids)
        box = _Mailbox(max(int(params.n), 1))
        try:
            self._engine.add_request(rid, list(prompt_ids), params.to_engine())
        except RuntimeError as e:  # failed or shut down between our check and the engine's
            raise EngineFailed(str(e)) if self._engine.failure is not None else e
        self._live[rid] = box
        try:
            while box.open or box.pending:
                for out in await box.take():
                    if out.finish_reason == "error":
                        if out.new_token_ids:  # what came before the fault is still delivered
                            yield dataclasses.replace(out, finished=False, finish_reason=None, error=None)
                        raise EngineError(out.error or "the engine failed on this request")
                    yield out
        finally:
            self._live.pop(rid, None)
            if box.open and not self._closed:
                self._engine.abort(rid)

    def abort_choice(self, request_id: int, index: int) -> None:
        """Stops one choice of an n > 1 request (say, a stop string ended it) and frees its pages;
        its stream still receives the choice's final "abort" output."""
        self._engine.abort(request_id, index)

    async def shutdown(self) -> None:
        """Stops intake, ends every request (the engine ends what it holds; this side ends the
        rest), joins the engine thread without blocking the event loop, then stops run()."""
        if self._closed:
            return
        self._closed = True
        await anyio.to_thread.run_sync(self._engine.shutdown)
        self._dispatch(self._engine.fetch())
        for box in self._live.values():
            box.end_open("abort", None)
        if self._running:
            try:  # wake run(): it sees _closed, returns and closes the socket pair
                self._notify_w.send(b"\0")
            except OSError:
                pass
        else:
            self._close_notify()

    def _close_notify(self) -> None:
        self._notify_r.close()
        self._notify_w.close()
