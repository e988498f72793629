#pragma once
// EngineCore: the serving engine as a synchronous state machine — no thread, no queue, no clock.
// One step() runs one batch through five named phases:
//   plan    the scheduler decides which tokens of which sequences run (admit, chunk, preempt);
//   build   the forward batch, and the map from its logit rows back to requests;
//   run     the model: K/V written into the cache, logits of the rows that sample;
//   accept  sampling, prompt logprobs and stop checks: what each request keeps of this step;
//   commit  KV bookkeeping (tokens computed and appended), outputs, finished requests freed.
// The threaded Engine (engine.h) is a thin loop around it; tests drive it one step at a time.
// The later mechanisms hang on these seams: prefix matching in plan, several accepted tokens per
// request (speculation) in accept, rollback of rejected drafts in commit, a GPU backend in run.
//
// Containment: an exception in a phase ends the requests it concerns with finish_reason "error" and
// the core carries on with everyone else — one request's fault in build / accept / commit ends that
// request; a fault in run ends the step's batch; a fault in plan (the scheduler's state can no
// longer be trusted) ends every live request and starts the cache bookkeeping afresh.
//
// Every choice of every request ends exactly once, whatever the path: finish, abort, error,
// shutdown (a debug build asserts it; a release build drops a second end and counts it).
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cache/block_pool.h"
#include "cache/kv_cache.h"
#include "cache/prefix_cache.h"
#include "engine/draft_model.h"
#include "engine/fault_switch.h"
#include "engine/medusa_heads.h"
#include "engine/ngram_proposer.h"
#include "engine/request.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "model/llama.h"

namespace pyserve {

enum class SpeculativeMode { disable, ngram, small_draft, eagle, medusa };

struct EngineConfig {
  int max_num_seqs = 4;
  int max_batch_tokens = 512;   // tokens per step (the prefill chunk): sizes the model's workspace
  int page_size = 16;
  int kv_capacity_tokens = 8192;  // rounded up to whole pages
  int max_model_len = 8192;     // prompt + output per sequence
  std::vector<int32_t> eos_token_ids;
  int notify_fd = -1;           // Engine only: it writes to its own dup of this fd
  int prompt_logit_rows = 32;   // prompt-logprob rows scored per LM-head call (bounds that buffer)
  bool chunked_prefill = false; // MLC's --prefill-mode chunked (else hybrid): see SchedulerConfig
  bool tracing = false;         // Engine only: keep an event trace (MLC's --enable-tracing)
  bool prefix_cache = true;     // radix prefix sharing (MLC's --prefix-cache-mode radix)
  // Finished sequences whose pages stay cached (MLC's prefix_cache_max_num_recycling_seqs):
  // 0 none, -1 unlimited, -2 (the default) max_num_seqs.
  int prefix_cache_max_recycling = -2;
  // Speculative decoding (MLC's --speculative-mode, plus vLLM's prompt lookup).
  SpeculativeMode speculative_mode = SpeculativeMode::disable;
  int spec_draft_length = 0;  // drafts per sequence and step; 0: automatic (see draft_policy.h)
  // Draft trees (MLC's --spec-tree-width): each draft position also verifies the draft source's
  // next width - 1 likeliest tokens as leaves (small_draft, eagle, medusa; ngram has one guess).
  int spec_tree_width = 1;
  // The automatic length's cost of one more token in a step, relative to a one-token step
  // (measured by the caller on the model and machine; 0: tokens are free, MLC's rule alone).
  double spec_token_cost = 0;
  // small_draft / medusa: what one draft costs to make, relative to a one-token target step
  // (measured by the caller; added to spec_token_cost when weighing drafts, before they are made).
  double spec_draft_cost = 0;
  NgramConfig ngram;
  // small_draft: the draft model (same vocabulary), with a KV cache of kv_capacity_tokens.
  // eagle: the EAGLE draft layer as a one-layer model, its input fc, and the token id of each of
  // its LM head rows (empty: the target's vocabulary).
  std::shared_ptr<LlamaModel> draft_model;
  std::shared_ptr<EagleInput> eagle;
  std::vector<int32_t> draft_vocab;
  // medusa: heads on the target's hidden states (built for this engine's model).
  std::shared_ptr<MedusaHeads> medusa;
};

struct EngineOutput {
  int64_t id = 0;
  int index = 0;                // which of the request's n choices
  std::vector<int32_t> tokens;  // new tokens since the last output of this choice
  bool finished = false;
  std::string finish_reason;    // "stop" | "length" | "abort" | "error" once finished
  std::string error;            // what went wrong, with finish_reason "error"
  int num_prompt_tokens = 0;
  int num_cached_tokens = 0;    // prompt tokens the prefix cache supplied
  std::vector<TokenLogprob> logprobs;  // aligned with tokens, when asked for
  bool has_prompt_logprobs = false;    // once, with the first output of choice 0
  std::vector<TokenLogprob> prompt_logprobs;  // for prompt positions 1.. (position 0 has none)
};

struct EngineStats {
  int num_running = 0, num_waiting = 0;
  int kv_pages_used = 0, kv_pages_total = 0, page_size = 0;
  // used (held by requests) + cached (held only by the prefix cache: evictable, but for pinned
  // prompts and pages a sliding window let go of on a path still locked) + free = total
  int kv_pages_cached = 0, kv_pages_free = 0;
  int64_t prefix_cache_nodes = 0;
  int64_t kv_capacity_tokens = 0;
  int64_t steps = 0, prompt_tokens_computed = 0, tokens_generated = 0, preemptions = 0;
  int64_t requests_failed = 0;  // choices ended with "error"
  int64_t step_failures = 0;    // contained faults
  int live_choices = 0;         // choices not ended yet
  int64_t step_index = 0;       // steps attempted (what FaultSwitch counts)
  // Speculative decoding: decode steps of one sequence that verified drafts, the drafts they
  // verified and accepted, and the accepted ones by position (1st draft, 2nd, ...).
  int64_t spec_verifies = 0, spec_draft_tokens = 0, spec_accepted_tokens = 0;
  std::vector<int64_t> spec_accepted_by_position;
  int64_t spec_accepted_leaves = 0;  // of the accepted: draft-tree leaves (alternatives to a draft)
  // Structured output: allowed-token masks computed, and the time spent computing them.
  int64_t grammar_masks = 0;
  double grammar_mask_seconds = 0;
};

class EngineCore {
 public:
  EngineCore(std::shared_ptr<LlamaModel> model, EngineConfig config);
  EngineCore(const EngineCore&) = delete;
  EngineCore& operator=(const EngineCore&) = delete;

  // Throws std::invalid_argument naming what is wrong (prompt empty or too long, token out of
  // vocabulary, bad sampling parameter). Thread-safe: reads only the configuration.
  void check_request(int64_t id, const std::vector<int32_t>& prompt, const SamplingParams& params) const;
  // Queues a request (checked again). A live id is invalid_argument. With params.n > 1 the prompt
  // is prefilled once; the other choices then share its full pages.
  void add_request(int64_t id, std::vector<int32_t> prompt, SamplingParams params);
  // Ends every choice of the request (index < 0) or one, with "abort"; unknown ones are ignored.
  void abort(int64_t id, int index = -1);
  // Ends a choice (index < 0: all of them) with finish_reason "error" and `message`.
  void fail(int64_t id, int index, const std::string& message);
  // Ends every live choice with `reason` ("abort" at shutdown, "error" when the engine gives up).
  void end_all(const char* reason, const std::string& message);

  // One engine step. Returns false when nothing could run (no requests, or none schedulable).
  // Faults are contained (see the header comment); only a failure of containment itself throws.
  bool step();
  bool idle() const { return requests_.empty(); }

  // The outputs since the last call, in the order they happened.
  std::vector<EngineOutput> take_outputs();
  // For the threaded engine: ends the n choices of a request that never became live (intake
  // failed: "error" with the message; shut down before it was taken in: "abort" when message is
  // empty). A duplicate of a live id is only logged: its ends belong to the live request.
  void reject(int64_t id, int n, int num_prompt, const std::string& message);
  // For the threaded engine: an end for a choice whose earlier output was lost in publishing.
  void emit_replacement_end(int64_t id, int index, const std::string& message);

  EngineStats stats() const;
  // Empties the prefix cache, pinned prompts included (MLC's reset_engine, after every request
  // ended). Throws std::logic_error while a request is live.
  void reset_cache();
  // What the last step ran, for the event trace: one entry per request chunk.
  struct StepChunk {
    int64_t id;
    int index, start, count, cached;
    bool prefill;
  };
  const std::vector<StepChunk>& last_step() const { return last_step_; }
  int64_t step_index() const { return step_index_; }
  FaultSwitch& faults() { return faults_; }
  const EngineConfig& config() const { return config_; }

 private:
  // One row range of this step's batch, and what it is for.
  struct RowUse {
    Request* req;
    int first_token;  // in batch_.tokens
    int count;        // tokens this step
    int start;        // first position
    bool sample;      // the chunk reaches the end of the known tokens: sample the next one
    int drafts;       // draft tokens it verifies (their rows sample too, after the first)
    int leaves;       // draft-tree leaves it verifies (rows after the drafts', sampling too)
    int sample_row;   // its (first) row in sample_logits_, or -1
    int prompt_row;   // first of its prompt-logprob rows in the hidden states, or -1
    int prompt_rows;
    int feature_row;  // eagle: first of its rows kept as features (a prompt chunk's), or -1
    int feature_rows;
  };
  // What accept decided for one request; commit applies it.
  struct Accepted {
    Request* req;
    int count;                      // tokens computed this step
    std::vector<int32_t> tokens;    // tokens accepted (one per decode now; several with drafts)
    std::vector<TokenLogprob> logprobs;
    std::vector<int> rows;          // the sample row (from the request's first) that drew each token
    const char* reason = nullptr;   // finish reason, if it finished
    int leaf_from = -1, leaf_to = -1;  // a kept tree leaf: its K/V moves from this position to that
  };

  // The phases (propose runs before plan: drafts for the sequences that decode).
  void propose();
  int draft_length() const;      // this step's drafts per sequence
  int max_draft_length() const;  // the most any step proposes
  // medusa: drafts for weighed[i] (keep[i] of them, when > 0) from the heads, batched.
  void propose_medusa(const std::vector<Request*>& weighed, const std::vector<int>& keep);
  // After any draft source proposed: drafts the grammar refuses go, and so do leaves past the
  // drafts kept; the rest in depth order.
  static void settle_drafts(Request& r);
  // medusa / eagle: the hidden states of this step's rows that drew r's accepted tokens (and, for
  // eagle, of its prompt chunk) into r.spec_features.
  void keep_features(const RowUse& u, Request& r, const std::vector<int>& rows);
  std::vector<ScheduledChunk> plan();
  void build(const std::vector<ScheduledChunk>& chunks);
  void run();
  void accept();
  void commit();

  // Containment.
  void recover_from_plan_failure(const std::string& message);
  void fail_request(Request& r, const std::string& message);

  // Endings: every path goes through end_choice, which enforces "exactly once".
  EngineOutput& emit(const Request& r);
  void end_choice(int64_t id, int index, int num_prompt, const char* reason, const std::string& message,
                  EngineOutput* carrier = nullptr);
  void finish(Request& r, const char* reason, const std::string& message = {});  // ends, then releases
  void release(Request& r);
  void fork(Request& parent);
  void seed_rng(Request& r);
  void score_prompt_rows(const RowUse& u, const float* hidden);
  // m's allowed tokens now (valid until the next call); *more: anything besides EOS.
  const uint32_t* grammar_mask(GrammarMatcher& m, bool* more);
  int64_t context_limit() const;

  std::shared_ptr<LlamaModel> model_;
  EngineConfig config_;
  KVCache cache_;
  BlockPool pool_;
  std::unique_ptr<PrefixCache> prefix_cache_;  // null when disabled
  std::unique_ptr<DraftModel> draft_;          // small_draft and eagle
  std::shared_ptr<MedusaHeads> medusa_;        // medusa only
  Scheduler scheduler_;
  Sampler sampler_;
  FaultSwitch faults_;
  std::map<int64_t, std::unique_ptr<Request>> requests_;  // by key(id, index)
  std::set<int64_t> open_choices_;                         // key(id, index) of choices not yet ended
  std::vector<EngineOutput> outputs_;

  // This step's working state (sized by the configuration, reused).
  ForwardBatch batch_;
  std::vector<RowUse> rows_;
  std::vector<Accepted> accepted_;
  std::vector<StepChunk> last_step_;
  const float* hidden_ = nullptr;        // final hidden states of batch_.logit_rows
  std::vector<int32_t> sample_rows_;     // indices into batch_.logit_rows that sample
  std::vector<float> sample_hidden_;     // [sample rows, hidden]
  std::vector<float> sample_logits_;     // [sample rows <= max_num_seqs, vocab]
  std::vector<float> prompt_logits_;     // [<= prompt_logit_rows, vocab]
  std::vector<uint32_t> grammar_mask_;   // [ceil(vocab / 32)] bits
  std::vector<float> medusa_hidden_;     // [sequences drafting, hidden]: the heads' input

  // Automatic draft length: the chance that a draft at position j >= 1 is kept when the one
  // before it was, measured over every sequence.
  std::vector<AcceptanceEstimate> spec_later_;
  int64_t step_index_ = 0;
  int rejected_last_plan_ = 0;
  EngineStats counters_;
  std::random_device seed_source_;
};

}  // namespace pyserve
