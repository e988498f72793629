"""From a validated request to text: sampling params, prompt checks, and one prompt's generation
loop (engine outputs -> per choice: incremental detokenizer -> stop strings -> logprob entries).

A prompt with n choices is ONE engine request (SamplingParams.n): the engine prefills the prompt
once and its choices share the prompt's KV pages; their outputs interleave and are told apart by
RequestOutput.index. Leaving early (every choice done, client gone, error) closes the engine's
async generator, which aborts the request in the engine and frees its KV pages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from pyserve.engine.detokenizer import IncrementalDetokenizer, TokenStrings
from pyserve.engine.sampling import SamplingParams
from pyserve.engine.stop import StopStringMatcher
from pyserve.protocol.errors import ProtocolError
from pyserve.protocol.requests import GenerationRequest, OutputLimits
from pyserve.protocol.responses import LogprobEntry, TokenInfo


def check_prompt_length(num_prompt_tokens: int, max_model_len: int, param: str) -> None:
    if num_prompt_tokens == 0:
        raise ProtocolError("The prompt is empty (0 tokens).", param=param)
    if num_prompt_tokens >= max_model_len:
        raise ProtocolError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens, which leaves no room for output. Please shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def check_token_ids(ids: Sequence[int], vocab_size: int | None, param: str) -> None:
    if vocab_size is None:
        return
    for tok in ids:
        if tok >= vocab_size:
            raise ProtocolError(f"Token id {tok} in '{param}' is out of range (vocabulary size {vocab_size}).", param=param)


def build_sampling_params(
    req: GenerationRequest,
    *,
    num_prompt_tokens: int,
    max_model_len: int,
    defaults: dict[str, Any] | None = None,
    limits: OutputLimits | None = None,
) -> SamplingParams:
    """SamplingParams for one prompt and all its choices. max_tokens: the request's, else the
    operator's default, else the endpoint's; capped by the operator's limit and by the room left
    in the context (see OutputLimits). Sampling fields the request leaves out take the model's
    generation defaults, else the neutral value. Seeds: the engine gives choice i of a seeded
    request seed + i."""
    defaults = defaults or {}
    limits = limits or OutputLimits()

    def pick(name: str, neutral: float) -> float:
        value = getattr(req, name)
        return float(value if value is not None else defaults.get(name, neutral))

    max_tokens = limits.max_tokens(req, max_model_len - num_prompt_tokens)
    if req.echo and max_tokens == 0:
        max_tokens = 1  # echo only: the engine generates one token, which we drop
    top_k = req.top_k if req.top_k is not None else int(defaults.get("top_k", 0) or 0)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=max(top_k, 0),  # -1 and 0 both mean "off"
        min_p=pick("min_p", 0.0),
        seed=None if req.seed is None else req.seed % 2**64,  # OpenAI seeds may be negative
        stop_token_ids=list(req.stop_token_ids),
        ignore_eos=req.ignore_eos,
        min_tokens=min(req.min_tokens, max_tokens),
        presence_penalty=pick("presence_penalty", 0.0),
        frequency_penalty=pick("frequency_penalty", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        logit_bias=dict(req.logit_bias),
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo else None,
        n=req.n,
    )


@dataclass
class ChoiceResult:
    text: str  # the whole text when generated without a sink, else ""
    finish_reason: str  # "stop" | "length" | "abort" (tool calls are the caller's reading of "stop")
    completion_tokens: int
    logprobs: list[LogprobEntry] | None = None  # the generated tokens' (without a sink); None: not asked


@dataclass
class PromptResult:
    choices: list[ChoiceResult]
    cached_tokens: int
    prompt_logprobs: list[LogprobEntry] | None  # echo with logprobs: one entry per prompt token


class Sink:
    """Receives a prompt's choices as they progress (streaming). Per choice: `start` once, then
    `delta`s, then `finish`; choices interleave."""

    async def start(self, choice: int, prompt_logprobs: list[LogprobEntry] | None) -> None: ...

    async def delta(self, choice: int, text: str, logprobs: list[LogprobEntry] | None) -> None: ...

    async def finish(self, choice: int, result: ChoiceResult) -> None: ...


class _aclosing:
    """contextlib.aclosing that tolerates iterators without aclose()."""

    def __init__(self, it: AsyncIterator[Any]) -> None:
        self.it = it

    async def __aenter__(self) -> AsyncIterator[Any]:
        return self.it

    async def __aexit__(self, *exc: object) -> None:
        aclose = getattr(self.it, "aclose", None)
        if aclose is not None:
            await aclose()


def token_entry(strings: TokenStrings, token_id: int, logprob: Any, offset: int) -> LogprobEntry:
    """A LogprobEntry from the engine's TokenLogprob (None: a position nothing predicts)."""
    text, raw = strings.get(token_id)
    if logprob is None:
        return LogprobEntry(TokenInfo(text, raw, None), None, offset)  # type: ignore[arg-type]
    top = []
    for tid, lp in logprob.top:
        t_text, t_raw = strings.get(int(tid))
        top.append(TokenInfo(t_text, t_raw, float(lp)))
    return LogprobEntry(TokenInfo(text, raw, float(logprob.logprob)), top, offset)


def prompt_entries(
    tokenizer: Any,
    strings: TokenStrings,
    prompt_ids: Sequence[int],
    prompt_logprobs: Sequence[Any] | None,
    *,
    skip: int = 0,
) -> list[LogprobEntry]:
    """Echo logprobs: one entry per prompt token; text offsets into the prompt's text, where the
    first `skip` tokens (a BOS the tokenizer added to a text prompt) take no room."""
    detok = IncrementalDetokenizer(tokenizer, (), skip_special_tokens=False)
    lps = list(prompt_logprobs or ())
    entries = []
    offset = 0
    for i, tid in enumerate(prompt_ids):
        lp = lps[i] if i < len(lps) else None
        entries.append(token_entry(strings, tid, lp, offset))
        if i >= skip:
            offset += len(detok.add([tid]))
    return entries


class _Choice:
    """One choice's text pipeline: ids -> detokenizer -> stop strings, plus logprob entries."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: Sequence[str], skip_special_tokens: bool) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
        self.matcher = StopStringMatcher(stops)
        self.text_len = 0  # characters out of the detokenizer so far (the stop matcher cuts later)
        self.tokens = 0
        self.started = False
        self.done = False
        self.pieces: list[str] = []
        self.entries: list[LogprobEntry] = []

    def feed(
        self,
        token_ids: list[int],
        logprobs: Sequence[Any] | None,
        strings: TokenStrings | None,
        finished: bool,
        hide_last: bool = False,
    ) -> tuple[str, list[LogprobEntry], bool]:
        """Takes one engine output; returns (text safe to show now, logprob entries of the tokens
        taken, stopped by a stop string?). Tokens after a stop string's end are not taken.
        `hide_last`: the last token stopped the choice (EOS or a stop_token_id): counted and in
        the logprobs, but its text is not shown (as vLLM does)."""
        out: list[str] = []
        entries: list[LogprobEntry] = []
        for j, tid in enumerate(token_ids):
            if strings is not None:
                lp = logprobs[j] if logprobs is not None and j < len(logprobs) else None
                entries.append(token_entry(strings, tid, lp, self.text_len))
            self.tokens += 1
            last = j == len(token_ids) - 1
            text = "" if hide_last and last else self.detok.add([tid])
            if finished and last:
                text += self.detok.flush()
            self.text_len += len(text)
            safe, stopped = self.matcher.feed(text)
            out.append(safe)
            if stopped:
                return "".join(out), entries, True
        return "".join(out), entries, False

    def end(self) -> str:
        """Text still held back at the end of a stream that hit no stop string."""
        safe, stopped = self.matcher.feed(self.detok.flush())
        return safe if stopped else safe + self.matcher.flush()


async def run_prompt(
    engine: Any,
    prompt_ids: list[int],
    params: Any,
    *,
    n: int = 1,
    stops: Sequence[str] = (),
    skip_special_tokens: bool = True,
    logprobs: bool = False,
    echo_only: bool = False,
    strings: TokenStrings | None = None,
    prompt_logprob_entries: Callable[[Sequence[Any] | None], list[LogprobEntry]] | None = None,
    sink: Sink | None = None,
) -> PromptResult:
    """Generates a prompt's n choices through one engine request.

    With a `sink`, each choice's text goes out as soon as it is final (complete characters, no
    part of a stop string), with the logprob entries of the tokens that came in that output (their
    text may still be held back). Without, text and entries are accumulated into the result.
    `echo_only`: the prompt is scored, not continued (echo with max_tokens 0): generated tokens
    are dropped. `prompt_logprob_entries` turns the engine's prompt logprobs into entries; when it
    is given, a choice starts only once the engine has sent them.
    """
    tokenizer = engine.model.tokenizer
    if logprobs and strings is None:
        strings = TokenStrings(tokenizer)
    # Tokens that end a choice with "stop" (the engine's EOS set, unless ignored, and
    # stop_token_ids): their text is not part of the answer.
    stop_ids = {int(t) for t in getattr(params, "stop_token_ids", ()) or ()}
    if not getattr(params, "ignore_eos", False):
        stop_ids.update(getattr(engine.model, "eos_token_ids", None) or getattr(tokenizer, "eos_token_ids", None) or ())
    choices = [_Choice(tokenizer, prompt_ids, stops, skip_special_tokens) for _ in range(n)]
    results: list[ChoiceResult | None] = [None] * n
    cached_tokens = 0
    wait_for_prompt = prompt_logprob_entries is not None
    prompt_lps: list[LogprobEntry] | None = None
    held: list[Any] = []  # outputs that came before the prompt logprobs they must follow

    async def finish(i: int, reason: str) -> None:
        st = choices[i]
        st.done = True
        text = "".join(st.pieces)
        res = ChoiceResult(text, reason, st.tokens, st.entries if logprobs else None)
        results[i] = res
        if sink is not None:
            await sink.finish(i, res)

    async def show_tail(i: int, text: str) -> None:
        """Text released at the end (held back by the stop matcher), with no tokens of its own."""
        if not text:
            return
        if sink is None:
            choices[i].pieces.append(text)
        else:
            await sink.delta(i, text, [] if logprobs else None)

    async def take(out: Any) -> None:
        i = int(getattr(out, "index", 0) or 0)
        if not 0 <= i < n:
            raise RuntimeError(f"the engine sent an output for choice {i} of {n}")
        st = choices[i]
        if st.done:
            return  # a stop string already ended this choice (its late outputs are dropped)
        if not st.started:
            st.started = True
            if sink is not None:
                await sink.start(i, prompt_lps)
        if echo_only:
            await finish(i, "length")
            return
        ids = list(out.new_token_ids)
        hide_last = bool(out.finished and out.finish_reason == "stop" and ids and ids[-1] in stop_ids)
        text, entries, stopped = st.feed(
            ids, getattr(out, "logprobs", None), strings if logprobs else None, out.finished, hide_last
        )
        if sink is None:
            st.pieces.append(text)
            st.entries.extend(entries)
        elif text or entries:
            await sink.delta(i, text, entries if logprobs else None)
        if stopped:
            await finish(i, "stop")
            if not out.finished and not all(c.done for c in choices):
                # The other choices go on; this one need not (frees its KV pages now).
                abort_choice = getattr(engine, "abort_choice", None)
                if abort_choice is not None:
                    abort_choice(getattr(out, "request_id", 0), i)
        elif out.finished:
            await show_tail(i, st.matcher.flush())
            await finish(i, out.finish_reason or "stop")

    async with _aclosing(engine.generate(prompt_ids, params)) as outputs:
        async for out in outputs:
            cached_tokens = max(cached_tokens, int(getattr(out, "num_cached_tokens", 0) or 0))
            if wait_for_prompt:
                plp = getattr(out, "prompt_logprobs", None)
                if plp is None:
                    held.append(out)
                    continue
                wait_for_prompt = False
                prompt_lps = prompt_logprob_entries(plp)  # type: ignore[misc]
                for early in held:
                    await take(early)
                held.clear()
            await take(out)
            if all(st.done for st in choices):
                break  # leaving closes the generator: the engine aborts what still runs
        else:
            if wait_for_prompt:  # the engine never sent prompt logprobs: show the prompt without them
                prompt_lps = prompt_logprob_entries(None)  # type: ignore[misc]
                for early in held:
                    await take(early)
            # The engine ended the stream without finishing every choice (shutdown).
            for i, st in enumerate(choices):
                if st.done:
                    continue
                if not st.started:
                    st.started = True
                    if sink is not None:
                        await sink.start(i, prompt_lps)
                await show_tail(i, st.end())
                await finish(i, "abort" if not echo_only else "length")
    if prompt_lps is None and prompt_logprob_entries is not None:
        prompt_lps = prompt_logprob_entries(None)
    return PromptResult([r for r in results if r is not None], cached_tokens, prompt_lps)
