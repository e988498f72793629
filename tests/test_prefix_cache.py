"""Prefix sharing in the scheduler, as pure logic (the scheduler harness over a BlockPool and a
PrefixCache; no model): what a new sequence reuses, what stays cached, eviction under a small
pool, preemption, recycling limits, and a leak check after random storms. Greedy equality of
model outputs with the cache on and off is in test_engine_prefix_cache.py."""

from __future__ import annotations

import random

from pyserve._C.testing import Scheduler

PS = 16


def sched(num_pages: int = 64, max_num_seqs: int = 4, max_batch_tokens: int = 512, max_recycling: int = -1,
          cache: bool = True) -> Scheduler:
    return Scheduler(num_pages=num_pages, page_size=PS, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                     prefix_cache=cache, max_recycling=max_recycling)


def run_to_length(s: Scheduler, sid: int, length: int, limit: int = 1000) -> None:
    """Steps until sequence `sid` has `length` tokens (prompt + generated)."""
    for _ in range(limit):
        if s.num_tokens(sid) >= length:
            return
        s.step()
    raise AssertionError("sequence never got there")


def check_pages(s: Scheduler) -> None:
    assert s.used_pages() + s.cached_pages() + s.free_pages() == s.total_pages()
    assert s.used_pages() >= 0 and s.cached_pages() >= 0
    # Counted independently: pages in use are exactly those some live sequence holds, and the
    # cache holds nothing beyond its tree.
    held = {p for i in s.running() + s.waiting() for p in s.pages(i) if p >= 0}
    assert s.used_pages() == len(held)
    assert s.cached_pages() <= s.tree_pages()


def system_prompt(n: int = 3 * PS + 5) -> list[int]:
    return [1000 + i for i in range(n)]


def test_a_new_sequence_starts_from_the_cached_whole_pages() -> None:
    s = sched()
    sys_p = system_prompt()  # 3 pages + 5 tokens
    s.add_tokens(1, sys_p + [1, 2, 3])
    run_to_length(s, 1, len(sys_p) + 3 + 4)
    s.remove(1)
    assert s.used_pages() == 0 and s.cached_pages() > 0
    s.take_copies()
    s.add_tokens(2, sys_p + [7, 8])
    plan = s.step()
    # The 3 whole pages are shared; the 5 tokens on the fourth page come from a copy of the
    # finished sequence's page, which is never shared because 2 writes the rest of it.
    assert plan == [(2, len(sys_p), 2, True)]
    assert s.num_cached_tokens(2) == len(sys_p)
    ((sid, src, dst),) = s.take_copies()
    assert sid == 2 and dst == s.pages(2)[3] and src != dst
    assert all(s.refcount(p) == 2 for p in s.pages(2)[:3])  # shared: the cache's and 2's reference
    check_pages(s)


def test_part_of_a_page_is_copied_from_a_running_sequences_page_too() -> None:
    s = sched()
    sys_p = system_prompt(2 * PS + 6)
    s.add_tokens(1, sys_p + [1] * 20)  # its third page starts with sys_p's last 6 tokens
    s.step()
    s.add_tokens(2, sys_p + [2] * 3)
    assert s.step() == [(1, len(sys_p) + 20, 1, True), (2, len(sys_p), 3, True)]
    ((sid, src, dst),) = s.take_copies()
    assert (sid, src) == (2, s.pages(1)[2]) and dst == s.pages(2)[2] and s.pages(1)[:2] == s.pages(2)[:2]
    check_pages(s)


def test_the_last_token_is_always_computed() -> None:
    s = sched()
    p = system_prompt(2 * PS)
    s.add_tokens(1, p)
    run_to_length(s, 1, len(p) + 2)
    s.remove(1)
    s.add_tokens(2, list(p))  # the same prompt, exactly two pages
    # One page shared, 15 tokens of the second copied: the last token is computed, to sample.
    assert s.step() == [(2, 2 * PS - 1, 1, True)]
    assert s.num_cached_tokens(2) == 2 * PS - 1


def test_sequences_in_flight_share_pages_as_soon_as_they_are_computed() -> None:
    s = sched(max_batch_tokens=2 * PS)
    sys_p = system_prompt(4 * PS)
    s.add_tokens(1, sys_p + [1])
    s.add_tokens(2, sys_p + [2])
    s.step()  # 1 prefills its first two pages; 2 waits for budget
    assert s.waiting() == [2]
    s.step()  # 1 prefills pages 3 and 4
    s.step()  # 1 samples; 2 is admitted and reuses the four pages 1 computed
    assert s.num_cached_tokens(2) == 4 * PS and s.num_computed(2) == 4 * PS + 1
    assert s.pages(1)[:4] == s.pages(2)[:4]
    check_pages(s)


def test_a_prefix_computed_twice_at_once_is_kept_once() -> None:
    """Two requests with one prompt admitted in the same step both compute it; the tree keeps the
    first one's pages and the second gives its copies back instead of holding them beside the
    tree's (where they would outlive the first request, locked)."""
    s = sched()
    sys_p = system_prompt(4 * PS)
    s.add_tokens(1, sys_p + [1])
    s.add_tokens(2, sys_p + [2])
    s.step()  # both admitted together: nothing was cached yet
    assert s.num_cached_tokens(1) == s.num_cached_tokens(2) == 0
    assert s.pages(1)[:4] == s.pages(2)[:4]  # 2's duplicates swapped for the tree's pages
    assert s.used_pages() == 4 + 2  # the shared prompt once, and each one's last page
    check_pages(s)
    s.remove(1)
    s.remove(2)
    assert s.used_pages() == 0 and s.cached_pages() == 4 + 2  # the prompt once, and each one's tail page
    check_pages(s)


def test_finished_and_preempted_pages_stay_cached_until_needed() -> None:
    s = sched(num_pages=8, max_num_seqs=2)
    s.add(1, 3 * PS)  # distinct tokens: no sharing
    run_to_length(s, 1, 3 * PS + 2)
    s.remove(1)
    assert s.used_pages() == 0 and s.cached_pages() == 4  # its 49 computed tokens: 3 pages and a tail
    # A newcomer that needs the whole pool evicts what it must: the cache never refuses it.
    s.add(2, 8 * PS - 1)
    s.step()
    assert s.running() == [2] and s.cached_pages() == 0 and s.free_pages() == 0
    check_pages(s)


def test_a_preempted_sequence_recomputes_mostly_from_the_cache() -> None:
    s = sched(num_pages=6, max_num_seqs=2, max_batch_tokens=4 * PS)
    s.add(1, 2 * PS + 8)
    s.add(2, 2 * PS + 8)
    s.step()
    assert s.running() == [1, 2]
    for _ in range(200):
        s.step()
        if s.preemptions():
            break
    assert s.preemptions() == 1 and s.waiting() == [2]
    assert s.cached_pages() >= 2  # 2's computed pages went to the cache, not to the free list
    s.remove(1)
    plan = s.step()
    (sid, start, count, sample), = plan
    assert sid == 2 and start >= 2 * PS  # resumed after its cached pages
    check_pages(s)


def test_recycling_limits_what_finished_sequences_leave() -> None:
    for limit, kept in ((0, 0), (1, 4), (-1, 8)):  # 3 whole pages and a tail each
        s = sched(max_recycling=limit)
        for sid in (1, 2):
            s.add(sid, 3 * PS + 4)
            run_to_length(s, sid, 3 * PS + 6)
            s.remove(sid)
        assert s.cached_pages() == kept, limit
        check_pages(s)


def test_prompt_pages_shared_while_running_survive_a_finish_without_recycling() -> None:
    s = sched(max_recycling=0)
    sys_p = system_prompt(2 * PS)
    s.add_tokens(1, sys_p + [1] * 5)
    run_to_length(s, 1, 2 * PS + 6)
    s.add_tokens(2, sys_p + [2] * 5)
    s.step()
    assert s.num_cached_tokens(2) == 2 * PS
    s.remove(1)  # 2 still uses the shared pages: they stay
    assert s.used_pages() == len(s.pages(2))
    s.remove(2)
    assert s.cached_pages() == 0 and s.used_pages() == 0


def test_storms_of_shared_prompts_leak_nothing() -> None:
    for seed in range(4):
        rng = random.Random(seed)
        s = sched(num_pages=24, max_num_seqs=4, max_batch_tokens=3 * PS, max_recycling=rng.choice([-1, 0, 2]))
        prefixes = [system_prompt(rng.randint(0, 3 * PS)) for _ in range(3)]
        live: list[int] = []
        next_id = 1
        for _ in range(300):
            r = rng.random()
            if r < 0.25 and len(live) < 8:
                tail = [rng.randint(0, 3) for _ in range(rng.randint(1, PS))]
                s.add_tokens(next_id, rng.choice(prefixes) + tail)
                live.append(next_id)
                next_id += 1
            elif r < 0.4 and live:
                s.remove(live.pop(rng.randrange(len(live))))
            else:
                s.step()
            for sid in list(live):
                if s.num_tokens(sid) > 6 * PS:  # long enough: finish it
                    s.remove(sid)
                    live.remove(sid)
            check_pages(s)
            for sid in s.running():
                assert s.num_computed(sid) <= min(s.num_tokens(sid), len(s.pages(sid)) * PS)
        for sid in live:
            s.remove(sid)
        assert s.used_pages() == 0 and not s.running() and not s.waiting()
        check_pages(s)
        assert s.cached_pages() == s.tree_pages()


def test_cache_off_matches_nothing() -> None:
    s = sched(cache=False)
    sys_p = system_prompt()
    s.add_tokens(1, sys_p + [1])
    run_to_length(s, 1, len(sys_p) + 3)
    s.remove(1)
    s.add_tokens(2, sys_p + [2])
    assert s.step() == [(2, 0, len(sys_p) + 1, True)]
    assert s.num_cached_tokens(2) == -1 and s.cached_pages() == 0
