#pragma once
// Which tokens of which sequences run in the next step. Pure logic over counters and a BlockPool:
// no model, no tensors, unit-tested on its own.
#include <cstdint>
#include <deque>
#include <vector>

#include "cache/block_pool.h"
#include "cache/prefix_cache.h"

namespace pyserve {

// What the scheduler knows of a request.
// A leaf of a draft tree: a token proposed in place of the chain's draft at `depth`.
struct DraftLeaf {
  int depth;
  int32_t token;
};

struct Sequence {
  int64_t id = 0;
  int num_tokens = 0;    // prompt + generated so far
  int num_computed = 0;  // tokens whose K/V are in the cache
  std::vector<int32_t> pages;  // page table: token t lives in pages[t / page_size]
  // Prefix sharing (with a PrefixCache). tokens: prompt + generated, owned by the request.
  const std::vector<int32_t>* tokens = nullptr;
  bool share_prefix = true;    // false: always compute from token 0 (prompt logprobs need every row)
  PrefixCache::NodeId cache_node = -1;  // the tree node this sequence locks, or -1
  int cached_pages = 0;        // pages[0 : cached_pages] are in the tree, on the path to cache_node
  int num_cached_tokens = -1;  // prompt tokens found cached when first admitted (-1: not yet)
  int pin_tokens = 0;          // > 0: pin the whole pages of tokens[0 : pin_tokens] once computed
  // Sliding window: pages[sink pages : released_end] were released (-1), never to be read again.
  // While it is 0 the sequence's pages enter the prefix cache; after, they stop (the tree keeps
  // paths without holes).
  int released_end = 0;
  // Speculative decoding: tokens proposed to follow `tokens` this step (not part of num_tokens).
  // A decode step verifies them: it computes the last token and as many drafts as the token
  // budget and free pages allow.
  std::vector<int32_t> drafts;
  // A draft tree (--spec-tree-width > 1): alternatives to drafts[depth] (children of the draft
  // before it, or of the last known token), sorted by depth. They are verified in the same step,
  // their K/V in the slots after the drafts'.
  std::vector<DraftLeaf> leaves;
};

struct ScheduledChunk {
  Sequence* seq;
  int start;    // first token index processed this step
  int count;    // tokens processed this step (a decode: 1 + the drafts it verifies)
  bool sample;  // the chunk reaches the end of the known tokens: sample the next one
  int leaves = 0;  // seq->leaves[0 : leaves] are verified too (after the count tokens)
  int drafts() const { return sample ? start + count - seq->num_tokens : 0; }
};

// A page to copy before the step runs: a new sequence's next tokens sit in the first slots of a
// cached page (part of a page is never shared, so it gets its own copy).
struct PageCopy {
  RadixTree::Partial source;  // source.page is copied; held until copies_done()
  int32_t dst = -1;
  const Sequence* seq = nullptr;
};

struct SchedulerConfig {
  int max_num_seqs = 4;        // sequences admitted (holding pages) at once
  int max_batch_tokens = 512;  // tokens per step: decodes + prefill chunks (chunked prefill)
  int page_size = 16;
  // MLC's --prefill-mode: hybrid steps batch prompt chunks with the running sequences' decodes;
  // chunked steps are all prefill (prompt chunks, admissions) or all decode, alternating while
  // both kinds of work wait.
  bool chunked_prefill = false;
  // When every layer of the model slides: its window, and the attention sink's tokens. A
  // sequence's pages wholly before its window (and after the sink) are released as it advances,
  // so a long generation holds the sink, the window and one page.
  int window = 0;
  int sink = 0;
};

// Hybrid steps: every running sequence first (a decode token, or the next chunk of its prompt),
// then new sequences from the waiting queue while the token budget, the sequence limit and free
// pages allow. When a running sequence needs a page and none is free, the most recently admitted
// one is preempted: its pages are freed and it re-enters the front of the queue to be recomputed.
// With a PrefixCache: an admitted sequence starts from the longest cached whole-page prefix of its
// tokens, its pages enter the cache as they are computed (computed()), and what it leaves behind
// when it finishes or is preempted stays cached; cached pages count as available and are evicted
// only when a page is needed.
class Scheduler {
 public:
  Scheduler(SchedulerConfig config, BlockPool& pool, PrefixCache* cache = nullptr);

  void add(Sequence* s);        // to the back of the waiting queue
  void add_front(Sequence* s);  // to the front (forked choices: next in line, pages already held)
  void remove(Sequence* s);  // finished or aborted: frees its pages; a no-op if unknown
  // After a step advanced s->num_computed: its newly completed pages enter the prefix cache.
  void computed(Sequence* s);
  // After a step that verified drafts and kept fewer: pages past the sequence's tokens go back.
  void trim(Sequence* s);
  // `child` starts as a copy of `parent`'s first `pages` pages (n > 1 choices share the prompt).
  void fork(Sequence* parent, Sequence* child, int pages);
  // Forgets every sequence without touching the pool (the engine resets both after a fault that
  // left the bookkeeping in doubt).
  void reset();

  // Plans the next step and allocates the pages it writes. Sequences that can never fit the
  // cache are moved to rejected() instead.
  std::vector<ScheduledChunk> schedule();
  std::vector<Sequence*> take_rejected();
  // The copies the planned step needs, to run before it; then copies_done() lets go of the sources.
  const std::vector<PageCopy>& pending_copies() const { return copies_; }
  void copies_done();

  const std::deque<Sequence*>& waiting() const { return waiting_; }
  const std::vector<Sequence*>& running() const { return running_; }
  bool idle() const { return waiting_.empty() && running_.empty(); }
  const SchedulerConfig& config() const { return config_; }
  int64_t num_preemptions() const { return num_preemptions_; }

 private:
  // One step's plan: every kind of work (hybrid), or only decodes, or only prompt chunks.
  std::vector<ScheduledChunk> plan_step(bool decode_only, bool prefill_only);
  bool grow(Sequence* s, int tokens);  // pages for the first `tokens` tokens; false if not free
  int available_pages() const { return cache_ ? static_cast<int>(cache_->available_pages()) : pool_.num_free(); }
  // A sequence about to be admitted starts from its cached prefix; true if it found one now.
  bool reuse_prefix(Sequence* s);
  void drop_copies(const Sequence* s);  // a planned copy into s is not needed after all
  void preempt(Sequence* s);
  bool reclaim_waiting(const Sequence* keep);  // frees one waiting sequence's pages, if any holds some
  void free_pages(Sequence* s, bool finished = false);
  int pages_for(int tokens) const { return (tokens + config_.page_size - 1) / config_.page_size; }
  // The most pages a sequence of `tokens` tokens holds at once.
  int live_pages(int tokens) const;
  void release_out_of_window(Sequence* s);

  SchedulerConfig config_;
  BlockPool& pool_;
  PrefixCache* cache_;
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> running_;
  std::vector<Sequence*> rejected_;
  std::vector<PageCopy> copies_;
  int64_t num_preemptions_ = 0;
  bool last_step_prefilled_ = false;  // chunked prefill: what the previous step was
  bool hold_admission_ = false;       // chunked prefill: this step already preempted
};

}  // namespace pyserve
