"""The prefix cache's radix tree as pure logic (page ids only, no model): unit tests, and a property
test that drives it with seeded random insert / match / lock / evict sequences against a naive
reference, a dict from every cached whole-page prefix to its page."""

from __future__ import annotations

import random

import pytest

from pyserve._C.testing import RadixTree

PS = 4  # tokens per page in these tests


def toks(*pages: int) -> list[int]:
    """One page of PS tokens per argument, all tokens of a page equal to it."""
    return [p for p in pages for _ in range(PS)]


def test_match_finds_the_longest_cached_prefix_in_whole_pages() -> None:
    t = RadixTree(PS)
    assert t.match(toks(1, 2, 3)) == ([], 0)
    node, adopted = t.insert(toks(1, 2, 3), [10, 11, 12])
    assert adopted == 0 and t.num_pages == 3 and t.evictable_pages == 3
    assert t.match(toks(1, 2, 3, 4))[0] == [10, 11, 12]
    assert t.match(toks(1, 2, 9))[0] == [10, 11]
    assert t.match(toks(1, 2, 3), max_pages=1)[0] == [10]
    # A partial last page never matches: only whole pages are shared.
    assert t.match(toks(1, 2) + [3, 3])[0] == [10, 11]
    assert t.match(toks(2))[0] == []
    # Same first page, different later tokens inside it: no match (pages are all or nothing).
    assert t.match([1, 1, 1, 0])[0] == []


def test_insert_keeps_cached_pages_and_adopts_the_rest() -> None:
    t = RadixTree(PS)
    t.insert(toks(1, 2), [10, 11])
    node, adopted = t.insert(toks(1, 2, 5, 6), [20, 21, 22, 23])
    assert adopted == 2  # 20 and 21 duplicate cached pages: the caller keeps them
    assert t.match(toks(1, 2, 5, 6))[0] == [10, 11, 22, 23]
    assert t.num_pages == 4
    # A branch in the middle of a node splits it; both branches stay.
    t.insert(toks(1, 7), [30, 31])
    assert t.match(toks(1, 2))[0] == [10, 11]
    assert t.match(toks(1, 7))[0] == [10, 31]
    assert t.num_pages == 5 and t.num_nodes == 4  # [1] -> ([2] -> [5, 6]), [7]
    # Inserting what is cached adopts nothing and ends at a node of its own.
    end, adopted = t.insert(toks(1, 2, 5), [40, 41, 42])
    assert adopted == 3 and t.match(toks(1, 2, 5)) == ([10, 11, 22], end)


def test_locked_paths_are_never_evicted_and_lru_goes_first() -> None:
    t = RadixTree(PS)
    a, _ = t.insert(toks(1, 2), [10, 11])
    b, _ = t.insert(toks(1, 3), [20, 21])  # splits [1]: [1] -> [2], [3]
    c, _ = t.insert(toks(4), [30])
    t.match(toks(1, 2))  # a's path is now the most recently used
    t.lock(c)
    assert t.evictable_pages == 3 and t.lock_count(c) == 1
    # b's leaf is the least recently used unlocked leaf; then a's leaf, then their shared [1].
    assert t.evict(1) == [21]
    assert t.evict(1) == [11]
    assert t.evict(5) == [10]  # c is locked: nothing else can go
    assert t.num_pages == 1 and t.evictable_pages == 0
    t.unlock(c)
    assert t.evictable_pages == 1 and t.evict(1) == [30] and t.num_nodes == 0
    assert not t.contains(c)
    with pytest.raises(Exception, match="unlock"):
        t.unlock(0)  # the root, never locked


def test_a_lock_survives_a_split_above_it() -> None:
    t = RadixTree(PS)
    end, _ = t.insert(toks(1, 2, 3), [10, 11, 12])
    t.lock(end)
    t.insert(toks(1, 9), [20, 21])  # splits the locked node: the upper part is locked as well
    assert t.evictable_pages == 1  # only page 21
    assert t.evict(10) == [21]
    t.unlock(end)
    assert t.evictable_pages == 3
    assert sorted(t.evict(10)) == [10, 11, 12]


def test_evict_path_removes_a_finished_branch_up_to_what_others_use() -> None:
    t = RadixTree(PS)
    shared, _ = t.insert(toks(1, 2), [10, 11])
    mine, _ = t.insert(toks(1, 2, 3, 4), [10, 11, 12, 13])
    other, _ = t.insert(toks(1, 2, 5), [10, 11, 14])
    assert sorted(t.evict_path(mine)) == [12, 13]  # stops at [1, 2], which has another child
    assert sorted(t.evict_path(other, keep=[shared])) == [14]  # stops at a node kept on purpose
    t.lock(shared)
    assert t.evict_path(shared) == []
    t.unlock(shared)
    assert sorted(t.evict_path(shared)) == [10, 11] and t.num_pages == 0
    assert t.evict_path(shared) == []  # gone: a no-op


def test_tails_and_first_pages_are_sources_for_part_of_a_page() -> None:
    t = RadixTree(PS)
    end, _ = t.insert(toks(1, 2), [10, 11])
    t.insert(toks(1, 2) + [3, 3, 3, 3], [10, 11, 12])  # child [3] of end
    assert t.insert_tail(end, [5, 6, 7], 20) == (True, [])
    assert t.num_pages == 4 and t.evictable_pages == 4
    assert t.match_partial(end, [3, 3, 9]) == (12, 2, t.match(toks(1, 2, 3))[1])  # a child's first page
    assert t.match_partial(end, [5, 6, 0, 0])[:2] == (20, 2)  # a tail
    assert t.match_partial(end, [5, 6, 7, 8])[:2] == (20, 3)
    assert t.match_partial(end, [5, 6, 7], )[:2] == (20, 3)
    assert t.match_partial(end, [8])[:2] == (-1, 0)
    assert t.match_partial(end, [5])[:2] == (20, 1)  # no more than the caller has
    # A shorter tail that ours contains is replaced; one that contains ours makes ours redundant.
    assert t.insert_tail(end, [5, 6], 21) == (False, [])
    assert t.insert_tail(end, [5, 6, 7], 22) == (False, [])
    assert t.insert_tail(end, [4], 23) == (True, [])
    assert t.num_pages == 5
    # Tails go before nodes, least recently used first; a locked node keeps its tails.
    t.match(toks(1, 2, 3))
    t.match_partial(end, [5, 6, 7])  # tail 20 is now the most recently used, then the child [3]
    assert t.evict(1) == [23]
    # A lock holds node pages only: no page table holds a tail, so a locked node's tails still go;
    # a tail being copied stays (and cannot be replaced) until unpinned.
    assert t.insert_tail(end, [9], 25) == (True, [])
    t.lock(end)
    t.pin_tail(end, 25)
    assert t.insert_tail(end, [9, 9], 26) == (False, [])  # busy: not replaced
    assert t.evictable_pages == 2 and sorted(t.evict(5)) == [12, 20]
    t.unpin_tail(end, 25)
    assert t.evictable_pages == 1 and t.evict(5) == [25]
    t.unlock(end)
    assert sorted(t.evict(5)) == [10, 11] and t.num_pages == 0
    with pytest.raises(Exception, match="no tail"):
        t.pin_tail(0, 20)


def test_evict_path_and_clear_take_the_tails_along() -> None:
    t = RadixTree(PS)
    end, _ = t.insert(toks(1), [10])
    t.insert_tail(end, [2], 20)
    assert sorted(t.evict_path(end)) == [10, 20]
    end, _ = t.insert(toks(1), [30])
    t.insert_tail(end, [2], 40)
    t.insert_tail(0, [3], 50)  # a tail at the root: a prompt shorter than a page
    assert sorted(t.clear()) == [30, 40, 50]


class Reference:
    """Every cached whole-page prefix (a tuple of tokens) -> its page, and the locked prefixes."""

    def __init__(self) -> None:
        self.pages: dict[tuple[int, ...], int] = {}
        self.tails: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}  # (prefix, tail tokens) -> page
        self.locks: list[tuple[int, ...]] = []

    def match(self, tokens: list[int], max_pages: int) -> list[int]:
        out = []
        for k in range(1, min(len(tokens) // PS, max_pages) + 1):
            page = self.pages.get(tuple(tokens[: k * PS]))
            if page is None:
                break
            out.append(page)
        return out

    def insert(self, tokens: list[int], pages: list[int]) -> int:
        adopted_from = len(pages)
        for k in range(1, len(pages) + 1):
            key = tuple(tokens[: k * PS])
            if key not in self.pages:
                adopted_from = min(adopted_from, k - 1)
                self.pages[key] = pages[k - 1]
        return adopted_from

    def locked(self, key: tuple[int, ...]) -> bool:
        return any(lock[: len(key)] == key for lock in self.locks)

    def insert_tail(self, prefix: tuple[int, ...], tail: tuple[int, ...], page: int) -> tuple[bool, list[int]]:
        for (p, have), old in list(self.tails.items()):
            if p != prefix or have[: len(tail)] != tail[: len(have)]:
                continue
            if len(have) >= len(tail):
                return False, []
            del self.tails[(p, have)]
            self.tails[(prefix, tail)] = page
            return True, [old]
        self.tails[(prefix, tail)] = page
        return True, []

    def best_partial(self, prefix: tuple[int, ...], tokens: list[int]) -> int:
        want = tokens[: PS - 1]
        sources = [key[len(prefix):] for key in self.pages if len(key) == len(prefix) + PS and key[: len(prefix)] == prefix]
        sources += [tail for (p, tail) in self.tails if p == prefix]
        best = 0
        for src in sources:
            r = 0
            while r < min(len(src), len(want)) and src[r] == want[r]:
                r += 1
            best = max(best, r)
        return best

    def evictable(self) -> int:
        return (sum(1 for key in self.pages if not self.locked(key))
                + len(self.tails))  # node locks do not hold tails (no page table does)


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_agree_with_a_dict_of_prefixes(seed: int) -> None:
    rng = random.Random(seed)
    t, ref = RadixTree(PS), Reference()
    next_page = 0
    held: list[tuple[int, tuple[int, ...]]] = []  # (node, the prefix it ends) of our locks

    def random_tokens() -> list[int]:
        # Few distinct tokens, so prompts share prefixes and diverge inside pages too.
        n = rng.randint(0, 8) * PS + rng.choice([0, 0, 1, PS - 1])
        return [rng.choice([0, 1]) if rng.random() < 0.8 else rng.randint(0, 2) for _ in range(n)]

    for _ in range(400):
        op = rng.random()
        tokens = random_tokens()
        if op < 0.35:
            n_pages = len(tokens) // PS
            pages = list(range(next_page, next_page + n_pages))
            next_page += n_pages
            expect = ref.insert(tokens, pages)
            node, adopted = t.insert(tokens, pages)
            assert adopted == expect
            if rng.random() < 0.3:
                t.lock(node)
                held.append((node, tuple(tokens[: n_pages * PS])))
                ref.locks.append(held[-1][1])
        elif op < 0.65:
            max_pages = rng.choice([1 << 40, rng.randint(0, 8)])
            pages, node = t.match(tokens, max_pages)
            assert pages == ref.match(tokens, max_pages)
            prefix = tuple(tokens[: len(pages) * PS])
            rest = tokens[len(pages) * PS:]
            page, r, _owner = t.match_partial(node, rest)
            assert r == ref.best_partial(prefix, rest)
            if r:  # the page holds those tokens: a tail's or a child's first page
                holders = [tail for (p, tail), pg in ref.tails.items() if p == prefix and pg == page]
                holders += [key[len(prefix):] for key, pg in ref.pages.items() if pg == page and key[: len(prefix)] == prefix]
                assert any(list(h[:r]) == rest[:r] for h in holders)
            if op < 0.45 and len(rest) % PS:  # cache this prompt's partly filled last page
                tail = tuple(rest[: len(rest) % PS]) if len(rest) < PS else None
                if tail:
                    adopted, released = t.insert_tail(node, list(tail), next_page)
                    assert (adopted, released) == ref.insert_tail(prefix, tail, next_page)
                    next_page += 1
            if rng.random() < 0.3:
                t.lock(node)
                held.append((node, tuple(tokens[: len(pages) * PS])))
                ref.locks.append(held[-1][1])
        elif op < 0.8 and held:
            node, key = held.pop(rng.randrange(len(held)))
            t.unlock(node)
            ref.locks.remove(key)
        elif op < 0.95:
            want = rng.randint(0, 6)
            before = ref.evictable()
            evicted = t.evict(want)
            assert len(evicted) >= min(want, before) or len(evicted) == before
            by_page = {page: key for key, page in ref.pages.items()}
            tail_by_page = {page: key for key, page in ref.tails.items()}
            for page in evicted:
                if page in tail_by_page:
                    del ref.tails[tail_by_page[page]]
                    continue
                key = by_page[page]
                assert not ref.locked(key), "a locked prefix was evicted"
                assert not any(p == key for p, _tail in ref.tails), "a node went before its tails"
                del ref.pages[key]
            # What is left is still closed under prefixes: only leaves went.
            for key in ref.pages:
                assert len(key) == PS or key[:-PS] in ref.pages
            for prefix, _tail in ref.tails:
                assert not prefix or prefix in ref.pages
        else:
            evicted_all = t.clear()
            assert sorted(evicted_all) == sorted([*ref.pages.values(), *ref.tails.values()])
            ref, held = Reference(), []
        assert t.num_pages == len(ref.pages) + len(ref.tails)
        assert t.evictable_pages == ref.evictable()
