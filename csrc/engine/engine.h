#pragma once
// The engine: its own thread owns the model, the KV cache and every request's state. Callers
// (Python) hand requests in and take token batches out through two small locked queues; the
// engine writes one byte to notify_fd whenever the output queue goes from empty to non-empty, so
// an event loop can wait on that fd instead of polling.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cache/block_pool.h"
#include "cache/kv_cache.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "model/llama.h"

namespace pyserve {

struct EngineConfig {
  int max_num_seqs = 4;
  int max_batch_tokens = 512;   // prefill chunk size: tokens per step
  int page_size = 16;
  int kv_capacity_tokens = 8192;  // rounded up to whole pages
  int max_model_len = 8192;     // prompt + output per sequence
  std::vector<int32_t> eos_token_ids;
  int notify_fd = -1;
};

struct EngineOutput {
  int64_t id = 0;
  int index = 0;                // which of the request's n choices
  std::vector<int32_t> tokens;  // new tokens since the last output of this choice
  bool finished = false;
  std::string finish_reason;    // "stop" | "length" | "abort" once finished
  int num_prompt_tokens = 0;
  std::vector<TokenLogprob> logprobs;  // aligned with tokens, when asked for
  bool has_prompt_logprobs = false;    // once, with the first output of choice 0
  std::vector<TokenLogprob> prompt_logprobs;  // for prompt positions 1.. (position 0 has none)
};

struct EngineStats {
  int num_running = 0, num_waiting = 0;
  int kv_pages_used = 0, kv_pages_total = 0, page_size = 0;
  int64_t kv_capacity_tokens = 0;
  int64_t steps = 0, prompt_tokens_computed = 0, tokens_generated = 0, preemptions = 0;
};

class Engine {
 public:
  Engine(std::shared_ptr<LlamaModel> model, EngineConfig config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Throws std::invalid_argument (prompt empty, too long, token out of vocabulary, bad params).
  // With params.n > 1 the prompt is prefilled once; the other choices then share its full KV
  // pages and recompute only the last, partly filled page.
  void add_request(int64_t id, std::vector<int32_t> prompt, SamplingParams params);
  // Every choice of the request (index < 0) or just one; unknown or finished ones are ignored.
  void abort(int64_t id, int index = -1);
  std::vector<EngineOutput> fetch();
  EngineStats stats() const;
  void shutdown();  // aborts everything and joins the thread; idempotent
  const EngineConfig& config() const { return config_; }

 private:
  // One choice of a request. Keyed by key(id, index).
  struct Request {
    Sequence seq;
    int64_t id = 0;
    int index = 0;
    std::vector<int32_t> tokens;  // prompt then generated
    int num_prompt = 0;
    int num_generated = 0;
    SamplingParams params;
    std::mt19937_64 rng;
    std::unique_ptr<TokenHistory> history;  // only when a penalty is asked for
    bool forked = false;                     // choice 0 of n > 1: the others exist
    bool prompt_logprobs_done = false;
    std::vector<TokenLogprob> prompt_logprobs;
  };
  // n <= 128 (SamplingParams::validate), so 256 keys per id never collide.
  static int64_t key(int64_t id, int index) { return id * 256 + index; }
  struct Incoming {
    int64_t id;
    std::vector<int32_t> prompt;
    SamplingParams params;
  };

  void loop();
  bool step();  // false: nothing could be scheduled
  void fork(Request& parent);
  void seed_rng(Request& r);
  void finish(Request& r, const char* reason);  // emits the end, then releases
  void release(Request& r);                      // frees pages and forgets the request
  EngineOutput& emit(const Request& r, bool finished, const char* reason);
  void publish();
  void update_stats();

  std::shared_ptr<LlamaModel> model_;
  EngineConfig config_;
  KVCache cache_;
  BlockPool pool_;
  Scheduler scheduler_;
  Sampler sampler_;
  std::map<int64_t, std::unique_ptr<Request>> requests_;  // engine thread only
  ForwardBatch batch_;
  std::vector<float> logits_;
  struct RowUse { Request* req; int first_row; int rows; int first_pos; bool sample; int count; };
  std::vector<RowUse> rows_;
  std::vector<EngineOutput> pending_out_;  // this step's outputs, before publishing

  mutable std::mutex in_mu_;
  std::condition_variable in_cv_;
  std::vector<Incoming> inbox_;
  std::vector<std::pair<int64_t, int>> aborts_;  // (id, index or -1)
  bool stop_ = false;

  mutable std::mutex out_mu_;
  std::vector<EngineOutput> outbox_;
  std::unordered_map<int64_t, size_t> outbox_index_;

  mutable std::mutex stats_mu_;
  EngineStats stats_;

  std::random_device seed_source_;
  std::thread thread_;
};

}  // namespace pyserve
