"""The scheduler and block pool as pure logic: no model, no tensors."""

from __future__ import annotations

import random

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


# --- sliding window: pages outside the window are released ---------------------------------------


def held(s: Scheduler, i: int) -> list[int]:
    return [p for p in s.pages(i) if p >= 0]


def check_window(s: Scheduler, i: int, window: int, sink: int, ps: int) -> None:
    """Every page a later query may read is held; every page it never will (past the sink,
    wholly before the window) is released."""
    lo = s.num_computed(i) - window + 1
    for k, p in enumerate(s.pages(i)):
        needed = k * ps < sink or (k + 1) * ps > lo
        assert (p >= 0) == needed, (k, p, lo, s.pages(i))


def test_a_sliding_sequence_holds_its_window_and_outgrows_the_cache() -> None:
    ps, window = 4, 8
    s = Scheduler(num_pages=6, page_size=ps, max_num_seqs=1, max_batch_tokens=16, window=window)
    s.add(1, 6)
    for _ in range(100):
        s.step()
        check_window(s, 1, window, 0, ps)
        assert len(held(s, 1)) <= window // ps + 2
        assert s.free_pages() + len(held(s, 1)) == 6
    assert s.num_tokens(1) == 106 > 6 * ps and s.preemptions() == 0
    s.remove(1)
    assert s.free_pages() == 6


def test_the_sink_pages_stay() -> None:
    ps, window, sink = 4, 8, 5  # the sink spans two pages
    s = Scheduler(num_pages=8, page_size=ps, max_num_seqs=1, max_batch_tokens=16, window=window, sink=sink)
    s.add(1, 3)
    for _ in range(60):
        s.step()
        check_window(s, 1, window, sink, ps)
    assert s.pages(1)[:2] == held(s, 1)[:2] and len(held(s, 1)) <= 2 + window // ps + 2


def test_a_prompt_longer_than_the_cache_is_prefilled_in_chunks() -> None:
    ps, window = 4, 8
    s = Scheduler(num_pages=6, page_size=ps, max_num_seqs=2, max_batch_tokens=64, window=window)
    s.add(1, 200)
    steps = run_until_prompt_done(s, 1)
    assert s.rejected() == [] and s.num_computed(1) == 200 and steps > 3
    # Without a window the same prompt could never fit.
    t = Scheduler(num_pages=6, page_size=ps, max_num_seqs=2, max_batch_tokens=64)
    t.add(1, 200)
    t.step()
    assert t.rejected() == [1]


def run_until_prompt_done(s: Scheduler, i: int) -> int:
    for n in range(1, 1000):
        s.step()
        if s.num_computed(i) >= s.num_tokens(i) - 1:
            return n
    raise AssertionError("the prompt never finished")


def test_sliding_window_with_the_prefix_cache() -> None:
    """A sliding sequence's prompt pages enter the tree (a second request shares them); once its
    window has passed them, the tree keeps them as evictable cache and the sequence holds only
    the sink and its window."""
    ps, window, sink = 4, 8, 4
    s = Scheduler(num_pages=16, page_size=ps, max_num_seqs=2, max_batch_tokens=64, prefix_cache=True,
                  window=window, sink=sink)
    prompt = list(range(1000, 1022))  # 22 tokens: 5 whole pages
    s.add_tokens(1, prompt)
    s.step()
    assert s.tree_pages() == 5
    check_window(s, 1, window, sink, ps)
    assert len(held(s, 1)) < 5  # the middle of the prompt is released, still in the (locked) tree
    assert s.used_pages() + s.cached_pages() + s.free_pages() == 16
    s.add_tokens(2, prompt + [5])
    s.step()
    assert s.num_cached_tokens(2) == 20  # the whole pages, served from the tree
    s.remove(2)
    for _ in range(30):
        s.step()
        check_window(s, 1, window, sink, ps)
        assert s.used_pages() + s.cached_pages() + s.free_pages() == 16
    # The window passed the prompt: only the sink and window are in use, the prompt is cache.
    assert s.used_pages() == len(held(s, 1)) <= 1 + window // ps + 2
    assert s.cached_pages() >= 4
    s.remove(1)
    assert s.used_pages() == 0 and s.cached_pages() + s.free_pages() == 16


def test_sliding_window_workload_keeps_the_books() -> None:
    """Random prompts with shared prefixes, a pool too small for everyone, removals mid-flight:
    pages in use + cached + free always add up, every live page is held, and nothing leaks."""
    rng = random.Random(11)
    ps, window, sink, total = 4, 12, 3, 24
    for cache in (False, True):
        s = Scheduler(num_pages=total, page_size=ps, max_num_seqs=4, max_batch_tokens=24, prefix_cache=cache,
                      max_recycling=2, window=window, sink=sink)
        target, next_id = {}, 0
        for step in range(400):
            if len(target) < 6 and rng.random() < 0.3:
                base = [7, 8, 9, 10, 11, 12, 13, 14, 15] if rng.random() < 0.5 else []
                s.add_tokens(next_id, base + [rng.randrange(10_000) for _ in range(rng.randrange(1, 40))])
                target[next_id] = rng.randrange(5, 80)
                next_id += 1
            s.step()
            assert s.rejected() == []
            assert s.used_pages() + s.cached_pages() + s.free_pages() == total
            for i in s.running():
                pages = held(s, i)
                assert len(set(pages)) == len(pages) and all(s.refcount(p) >= 1 for p in pages)
                check_window(s, i, window, sink, ps)
            for i in list(target):
                if i in s.running() and s.num_tokens(i) >= target[i]:
                    s.remove(i)
                    del target[i]
                elif i in s.running() and rng.random() < 0.02:  # an abort
                    s.remove(i)
                    del target[i]
        for i in list(target):
            s.remove(i)
        assert s.used_pages() == 0 and s.cached_pages() + s.free_pages() == total
