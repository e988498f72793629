"""EngineCore, the engine without its thread: tests step it one step at a time (no polling, no
sleeps), inject faults into each phase, and check that every choice of every request ends exactly
once and every KV page comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import tiny_models
from engine_helpers import c_model, our_logits
from pyserve import _C
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import load_model

PAGE = 4


@pytest.fixture(scope="module")
def cm(tmp_path_factory):
    model = load_model(tiny_models.make_llama(tmp_path_factory.mktemp("core-llama")))
    return c_model(model)


def core(cm, **cfg) -> "_C.EngineCore":
    options = {"max_num_seqs": 4, "max_batch_tokens": 32, "page_size": PAGE, "kv_capacity_tokens": 256,
               "max_model_len": 256, "eos_token_ids": []}
    options.update(cfg)
    return _C.EngineCore(cm, options)


def prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, 300, n)]


def greedy(max_tokens: int, **kw) -> dict:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw).to_engine()


@dataclass
class Choice:
    tokens: list[int] = field(default_factory=list)
    ends: list[tuple[str, str | None]] = field(default_factory=list)
    prompt_logprobs: list | None = None


def drain(engine, seen: dict[tuple[int, int], Choice], max_steps: int = 1000) -> int:
    """Steps until the core is idle; returns the number of steps. Collects outputs into `seen`."""
    steps = 0
    while not engine.idle:
        assert steps < max_steps, "the engine did not finish"
        engine.step()
        steps += 1
        collect(engine, seen)
    collect(engine, seen)
    return steps


def collect(engine, seen: dict[tuple[int, int], Choice]) -> None:
    for rid, index, toks, finished, reason, _n, _lp, plp, error, _cached in engine.take_outputs():
        c = seen.setdefault((rid, index), Choice())
        c.tokens += toks
        if plp is not None:
            c.prompt_logprobs = plp
        if finished:
            c.ends.append((reason, error))


def assert_clean(engine) -> None:
    s = engine.stats()
    assert s["kv_pages_used"] == 0 and s["live_choices"] == 0
    assert s["num_running"] == 0 and s["num_waiting"] == 0


def reference_greedy(cm, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(our_logits(cm, ids + out, [])[-1].argmax()))
    return out


# --- stepping ------------------------------------------------------------------------------------


def test_each_step_is_one_phase_cycle_and_the_core_is_idle_after(cm) -> None:
    e = core(cm)
    ids = prompt(10, 1)
    e.add_request(1, ids, greedy(5))
    assert not e.idle
    e.step()  # prefill (10 tokens fit one 32-token step) and the first sampled token
    (out,) = e.take_outputs()
    assert out[0] == 1 and len(out[2]) == 1 and not out[3]
    for i in range(4):
        assert e.step()
        (out,) = e.take_outputs()
        assert len(out[2]) == 1 and out[3] == (i == 3)
    assert e.idle and not e.step()  # nothing left: step() says so instead of spinning
    assert e.step_index == 5
    assert_clean(e)


def test_greedy_tokens_match_the_model(cm) -> None:
    ids = prompt(9, 2)
    e = core(cm)
    e.add_request(7, ids, greedy(6))
    seen: dict = {}
    drain(e, seen)
    assert seen[(7, 0)].tokens == reference_greedy(cm, ids, 6)
    assert seen[(7, 0)].ends == [("length", None)]


def test_long_prompt_is_chunked_across_steps(cm) -> None:
    e = core(cm, max_batch_tokens=8)
    ids = prompt(30, 3)
    e.add_request(1, ids, greedy(2))
    for _ in range(3):  # 8 + 8 + 8 prompt tokens: no output yet
        e.step()
        assert e.take_outputs() == []
    seen: dict = {}
    drain(e, seen)
    assert seen[(1, 0)].tokens == reference_greedy(cm, ids, 2)


def test_prompt_logprobs_are_scored_in_bounded_slices(cm) -> None:
    """Echo + logprobs over a prompt longer than one step, with the LM head run on 5 rows at a time:
    the logprobs still equal the model's log-softmax at every prompt position."""
    ids = prompt(37, 4)
    e = core(cm, max_batch_tokens=16, prompt_logit_rows=5)
    e.add_request(1, ids, greedy(1, prompt_logprobs=2))
    seen: dict = {}
    drain(e, seen)
    plp = seen[(1, 0)].prompt_logprobs
    assert plp is not None and len(plp) == len(ids) - 1
    logits = our_logits(cm, ids, [])
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    for pos, (token, logprob, top) in enumerate(plp):
        assert token == ids[pos + 1]
        assert logprob == pytest.approx(ref[pos, token], abs=1e-4)
        assert [t for t, _ in top] == list(np.argsort(-ref[pos], kind="stable")[:2])


def test_n_choices_end_once_each_and_free_their_pages(cm) -> None:
    e = core(cm)
    e.add_request(3, prompt(13, 5), SamplingParams(max_tokens=4, temperature=1.0, seed=9, n=3, ignore_eos=True).to_engine())
    seen: dict = {}
    drain(e, seen)
    assert sorted(seen) == [(3, 0), (3, 1), (3, 2)]
    assert all(c.ends == [("length", None)] and len(c.tokens) == 4 for c in seen.values())
    assert_clean(e)


def test_abort_of_a_choice_before_the_fork(cm) -> None:
    e = core(cm)
    e.add_request(4, prompt(13, 6), SamplingParams(max_tokens=3, temperature=1.0, seed=1, n=3, ignore_eos=True).to_engine())
    e.abort(4, 2)  # choice 2 does not exist yet: it ends now, and the fork skips it
    seen: dict = {}
    drain(e, seen)
    assert seen[(4, 2)].ends == [("abort", None)] and seen[(4, 2)].tokens == []
    assert seen[(4, 0)].ends == [("length", None)] and seen[(4, 1)].ends == [("length", None)]
    assert_clean(e)


def test_abort_and_end_all_end_every_choice_once(cm) -> None:
    e = core(cm)
    e.add_request(1, prompt(20, 7), greedy(50))
    e.add_request(2, prompt(8, 8), SamplingParams(max_tokens=50, temperature=1.0, seed=2, n=2).to_engine())
    e.add_request(3, prompt(8, 9), greedy(50))
    seen: dict = {}
    e.step()
    e.abort(1)
    e.abort(1)  # a second abort of a finished request is ignored
    e.end_all("abort", "")
    collect(e, seen)
    assert {k: c.ends for k, c in seen.items()} == {(1, 0): [("abort", None)], (2, 0): [("abort", None)],
                                                      (2, 1): [("abort", None)], (3, 0): [("abort", None)]}
    assert_clean(e)


def test_duplicate_live_id_is_refused(cm) -> None:
    e = core(cm)
    e.add_request(1, prompt(5, 1), greedy(3))
    with pytest.raises(ValueError, match="already live"):
        e.add_request(1, prompt(5, 2), greedy(3))
    seen: dict = {}
    drain(e, seen)
    assert seen[(1, 0)].ends == [("length", None)]


def test_bad_requests_are_value_errors(cm) -> None:
    e = core(cm)
    with pytest.raises(ValueError, match="no tokens"):
        e.add_request(1, [], greedy(3))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        e.add_request(1, [10**6], greedy(3))
    with pytest.raises(ValueError, match="context holds 256"):
        e.add_request(1, prompt(300, 1), greedy(3))
    assert e.idle and e.stats()["live_choices"] == 0


# --- containment: a fault in each phase ----------------------------------------------------------

VICTIM, BYSTANDER = 11, 12


def faulted_run(cm, phase: str, *, targeted: bool, alloc: bool = False, at_step: int = 2) -> dict:
    """Two requests running together; a fault in `phase` at `at_step` (aimed at VICTIM if targeted).
    Returns what each choice received."""
    e = core(cm)
    e.add_request(VICTIM, prompt(12, 20), greedy(6))
    e.add_request(BYSTANDER, prompt(9, 21), greedy(6))
    e.inject_fault(phase, at_step=at_step, request_id=VICTIM if targeted else -1, alloc=alloc)
    seen: dict = {}
    drain(e, seen)
    assert_clean(e)
    s = e.stats()
    assert s["step_failures"] >= 1
    return seen


@pytest.mark.parametrize("phase", ["build", "accept", "commit"])
@pytest.mark.parametrize("alloc", [False, True])
def test_a_request_fault_ends_that_request_only(cm, phase: str, alloc: bool) -> None:
    seen = faulted_run(cm, phase, targeted=True, alloc=alloc)
    ((reason, error),) = seen[(VICTIM, 0)].ends
    assert reason == "error"
    assert ("bad_alloc" in error or "bad allocation" in error) if alloc else f"injected fault in {phase}" in error
    assert seen[(BYSTANDER, 0)].ends == [("length", None)]
    assert seen[(BYSTANDER, 0)].tokens == reference_greedy(cm, prompt(9, 21), 6)


def test_a_run_fault_ends_the_batch_and_the_core_goes_on(cm) -> None:
    seen = faulted_run(cm, "run", targeted=False)
    for key in [(VICTIM, 0), (BYSTANDER, 0)]:
        ((reason, error),) = seen[key].ends
        assert reason == "error" and "running the model" in error


def test_a_plan_fault_ends_everyone_and_resets_the_bookkeeping(cm) -> None:
    e = core(cm)
    e.add_request(1, prompt(12, 20), greedy(6))
    e.add_request(2, prompt(9, 21), SamplingParams(max_tokens=6, temperature=0.0, n=3, ignore_eos=True).to_engine())
    e.inject_fault("plan", at_step=1, alloc=True)  # before the n = 3 request has forked
    seen: dict = {}
    drain(e, seen)
    assert sorted(seen) == [(1, 0), (2, 0), (2, 1), (2, 2)]
    assert all(len(c.ends) == 1 and c.ends[0][0] == "error" for c in seen.values())
    assert_clean(e)
    # The core serves new requests as before.
    ids = prompt(7, 22)
    e.add_request(3, ids, greedy(4))
    drain(e, seen)
    assert seen[(3, 0)].tokens == reference_greedy(cm, ids, 4) and seen[(3, 0)].ends == [("length", None)]


def test_an_intake_fault_refuses_the_request(cm) -> None:
    e = core(cm)
    e.inject_fault("intake", request_id=5)
    with pytest.raises(RuntimeError, match="injected fault in intake"):
        e.add_request(5, prompt(6, 1), greedy(2))
    assert e.idle and e.stats()["live_choices"] == 0
    e.add_request(5, prompt(6, 1), greedy(2))  # one-shot: the next try goes through
    seen: dict = {}
    drain(e, seen)
    assert seen[(5, 0)].ends == [("length", None)]


def test_every_phase_fault_leaves_every_choice_ended_exactly_once(cm) -> None:
    rng = np.random.default_rng(0)
    for trial in range(12):
        e = core(cm, max_batch_tokens=int(rng.integers(4, 33)), max_num_seqs=int(rng.integers(1, 5)))
        expected = set()
        for rid in range(1, 5):
            n = int(rng.integers(1, 4))
            e.add_request(rid, prompt(int(rng.integers(2, 40)), trial * 10 + rid),
                          SamplingParams(max_tokens=int(rng.integers(1, 8)), temperature=1.0, seed=rid, n=n).to_engine())
            expected |= {(rid, i) for i in range(n)}
        phase = ["plan", "build", "run", "accept", "commit"][trial % 5]
        e.inject_fault(phase, at_step=int(rng.integers(1, 6)), request_id=int(rng.integers(-1, 5)),
                       alloc=bool(trial % 2), times=int(rng.integers(1, 3)))
        if rng.random() < 0.5:
            e.abort(int(rng.integers(1, 5)), int(rng.integers(-1, 3)))
        seen: dict = {}
        drain(e, seen)
        assert set(seen) == expected
        assert all(len(c.ends) == 1 for c in seen.values()), {k: c.ends for k, c in seen.items()}
        assert_clean(e)
