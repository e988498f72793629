"""The scheduler and block pool as pure logic: no model, no tensors."""

from __future__ import annotations

from pyserve._C.testing import Scheduler


def run_until_idle(s: Scheduler, limit: int = 10_000) -> list[list[tuple[int, int, int, bool]]]:
    steps = []
    for _ in range(limit):
        plan = s.step()
        if not plan:
            return steps
        steps.append(plan)
    raise AssertionError("scheduler never went idle")


def test_prefill_is_chunked_by_the_token_budget() -> None:
    s = Scheduler(num_pages=64, page_size=16, max_num_seqs=4, max_batch_tokens=100)
    s.add(1, 250)
    plans = [s.step() for _ in range(3)]
    assert plans == [[(1, 0, 100, False)], [(1, 100, 100, False)], [(1, 200, 50, True)]]
    assert s.num_tokens(1) == 251 and s.num_computed(1) == 250
    assert s.step() == [(1, 250, 1, True)]  # decode
    assert len(s.pages(1)) == 16  # ceil(252 / 16)


def test_decodes_go_first_then_new_prompts_share_the_budget() -> None:
    s = Scheduler(num_pages=64, page_size=16, max_num_seqs=4, max_batch_tokens=64)
    s.add(1, 10)
    assert s.step() == [(1, 0, 10, True)]
    s.add(2, 100)
    s.add(3, 5)
    # 1 decodes (1 token), 2 takes the remaining 63 tokens; 3 waits for budget.
    assert s.step() == [(1, 10, 1, True), (2, 0, 63, False)]
    assert s.step() == [(1, 11, 1, True), (2, 63, 37, True), (3, 0, 5, True)]


def test_sequence_limit_holds_back_admission() -> None:
    s = Scheduler(num_pages=64, page_size=16, max_num_seqs=2, max_batch_tokens=512)
    for i in range(3):
        s.add(i, 8)
    plan = s.step()
    assert [c[0] for c in plan] == [0, 1]
    assert s.waiting() == [2]
    s.remove(0)
    assert [c[0] for c in s.step()] == [1, 2]


def test_pages_are_freed_on_remove() -> None:
    s = Scheduler(num_pages=8, page_size=4, max_num_seqs=4, max_batch_tokens=64)
    s.add(1, 13)
    s.step()
    assert s.free_pages() == 8 - 4
    s.remove(1)
    assert s.free_pages() == 8
    assert s.running() == [] and s.waiting() == []


def test_preemption_when_pages_run_out_and_everyone_finishes() -> None:
    # 6 pages of 4 tokens; two sequences of 8 prompt tokens each grow until they collide.
    s = Scheduler(num_pages=6, page_size=4, max_num_seqs=2, max_batch_tokens=64)
    s.add(1, 8)
    s.add(2, 8)
    assert len(s.step()) == 2
    preempted = False
    for _ in range(6):
        s.step()
        if s.preemptions():
            preempted = True
            break
    assert preempted
    assert s.waiting() == [2]  # the newer one yields and will be recomputed
    assert s.free_pages() + len(s.pages(1)) == 6
    # Finish 1; 2 comes back and recomputes its prompt and generated tokens in one chunk.
    done = s.num_tokens(2)
    s.remove(1)
    plan = s.step()
    assert plan == [(2, 0, done, True)]


def test_a_prompt_larger_than_the_whole_cache_is_rejected() -> None:
    s = Scheduler(num_pages=4, page_size=4, max_num_seqs=2, max_batch_tokens=64)
    s.add(1, 100)
    s.add(2, 3)
    assert s.step() == [(2, 0, 3, True)]
    assert s.rejected() == [1]


def test_many_sequences_all_complete_without_leaking_pages() -> None:
    s = Scheduler(num_pages=20, page_size=4, max_num_seqs=3, max_batch_tokens=16)
    lengths = {i: 3 + 5 * i for i in range(6)}
    for i, n in lengths.items():
        s.add(i, n)
    target = {i: n + 6 for i, n in lengths.items()}  # six generated tokens each
    for _ in range(1000):
        s.step()
        for i in list(target):
            if i in s.running() and s.num_tokens(i) >= target[i]:
                s.remove(i)
                del target[i]
        if not target:
            break
    assert not target
    assert s.free_pages() == 20


# --- --prefill-mode chunked ------------------------------------------------------------------------


def test_chunked_prefill_alternates_prefill_steps_and_decode_steps() -> None:
    s = Scheduler(num_pages=64, page_size=16, max_num_seqs=4, max_batch_tokens=32, chunked_prefill=True)
    s.add(1, 10)
    assert s.step() == [(1, 0, 10, True)]  # prefill (nothing else to do)
    s.add(2, 70)
    steps = [s.step() for _ in range(7)]
    assert steps == [
        [(1, 10, 1, True)],    # decode step (the last one prefilled): 2's prompt waits
        [(2, 0, 32, False)],   # prefill step: 1's decode waits
        [(1, 11, 1, True)],
        [(2, 32, 32, False)],
        [(1, 12, 1, True)],
        [(2, 64, 6, True)],    # 2's last chunk samples
        [(1, 13, 1, True), (2, 70, 1, True)],  # both decode together
    ]


def test_chunked_prefill_never_leaves_a_step_empty_when_work_waits() -> None:
    # Only decodes: every step decodes; a prompt that cannot be admitted (sequence limit) does not
    # make a "prefill step" that does nothing.
    s = Scheduler(num_pages=64, page_size=16, max_num_seqs=1, max_batch_tokens=32, chunked_prefill=True)
    s.add(1, 5)
    s.add(2, 5)
    assert s.step() == [(1, 0, 5, True)]
    for i in range(4):
        assert s.step() == [(1, 5 + i, 1, True)]
    s.remove(1)
    assert s.step() == [(2, 0, 5, True)]
