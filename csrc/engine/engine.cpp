#include "engine/engine.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace pyserve {

namespace {
int pages_for(int64_t tokens, int page_size) { return static_cast<int>((tokens + page_size - 1) / page_size); }
}  // namespace

Engine::Engine(std::shared_ptr<LlamaModel> model, EngineConfig config)
    : model_(std::move(model)),
      config_(std::move(config)),
      cache_(model_->backend(), model_->config().num_layers,
             pages_for(std::max(config_.kv_capacity_tokens, 1), std::max(config_.page_size, 1)),
             std::max(config_.page_size, 1), model_->config().kv_dim()),
      pool_(cache_.num_pages()),
      scheduler_({config_.max_num_seqs, config_.max_batch_tokens, config_.page_size}, pool_) {
  if (config_.page_size < 1) throw std::invalid_argument("page_size must be >= 1");
  if (config_.max_model_len < 2) throw std::invalid_argument("max_model_len must be >= 2");
  stats_.kv_pages_total = pool_.num_pages();
  stats_.page_size = config_.page_size;
  stats_.kv_capacity_tokens = cache_.capacity_tokens();
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() { shutdown(); }

void Engine::shutdown() {
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    if (stop_ && !thread_.joinable()) return;
    stop_ = true;
  }
  in_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Engine::add_request(int64_t id, std::vector<int32_t> prompt, SamplingParams params) {
  params.validate();
  if (prompt.empty()) throw std::invalid_argument("the prompt has no tokens");
  const int vocab = model_->config().vocab_size;
  for (int32_t t : prompt)
    if (t < 0 || t >= vocab)
      throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                  std::to_string(vocab) + ")");
  const int64_t limit = std::min<int64_t>(config_.max_model_len, cache_.capacity_tokens());
  if (static_cast<int64_t>(prompt.size()) >= limit)
    throw std::invalid_argument("the prompt has " + std::to_string(prompt.size()) +
                                " tokens, but the context holds " + std::to_string(limit) +
                                " (prompt and output together)");
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    if (stop_) throw std::runtime_error("the engine is shut down");
    inbox_.push_back({id, std::move(prompt), std::move(params)});
  }
  in_cv_.notify_one();
}

void Engine::abort(int64_t id) {
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    aborts_.push_back(id);
  }
  in_cv_.notify_one();
}

std::vector<EngineOutput> Engine::fetch() {
  std::lock_guard<std::mutex> lock(out_mu_);
  std::vector<EngineOutput> out;
  out.swap(outbox_);
  outbox_index_.clear();
  return out;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

void Engine::emit(int64_t id, const int32_t* tokens, int n, bool finished, const char* reason, int num_prompt) {
  EngineOutput o;
  o.id = id;
  o.tokens.assign(tokens, tokens + n);
  o.finished = finished;
  o.finish_reason = reason ? reason : "";
  o.num_prompt_tokens = num_prompt;
  pending_out_.push_back(std::move(o));
}

void Engine::publish() {
  if (pending_out_.empty()) return;
  bool was_empty;
  {
    std::lock_guard<std::mutex> lock(out_mu_);
    was_empty = outbox_.empty();
    for (EngineOutput& o : pending_out_) {
      // A slow reader gets one merged entry per request rather than one per step.
      auto it = outbox_index_.find(o.id);
      if (it == outbox_index_.end()) {
        outbox_index_[o.id] = outbox_.size();
        outbox_.push_back(std::move(o));
      } else {
        EngineOutput& m = outbox_[it->second];
        m.tokens.insert(m.tokens.end(), o.tokens.begin(), o.tokens.end());
        m.finished = o.finished;
        m.finish_reason = o.finish_reason;
      }
    }
  }
  pending_out_.clear();
  if (was_empty && config_.notify_fd >= 0) {
    const char byte = 1;
    // Non-blocking socket: if it is full, the reader is already awake.
    ssize_t ignored = ::write(config_.notify_fd, &byte, 1);
    (void)ignored;
  }
}

void Engine::release(Request& r) {
  scheduler_.remove(&r.seq);
  requests_.erase(r.seq.id);  // r is gone after this line
}

void Engine::finish(Request& r, const char* reason) {
  emit(r.seq.id, nullptr, 0, true, reason, r.num_prompt);
  release(r);
}

void Engine::update_stats() {
  std::lock_guard<std::mutex> lock(stats_mu_);
  stats_.num_running = static_cast<int>(scheduler_.running().size());
  stats_.num_waiting = static_cast<int>(scheduler_.waiting().size());
  stats_.kv_pages_used = pool_.num_used();
}

void Engine::loop() {
  for (;;) {
    std::vector<Incoming> incoming;
    std::vector<int64_t> aborts;
    {
      std::unique_lock<std::mutex> lock(in_mu_);
      in_cv_.wait(lock, [&] { return stop_ || !inbox_.empty() || !aborts_.empty() || !scheduler_.idle(); });
      if (stop_) break;
      incoming.swap(inbox_);
      aborts.swap(aborts_);
    }
    for (Incoming& in : incoming) {
      if (requests_.count(in.id)) {  // a duplicate id is the caller's bug; refuse the newcomer
        emit(in.id, nullptr, 0, true, "abort", static_cast<int>(in.prompt.size()));
        continue;
      }
      auto r = std::make_unique<Request>();
      r->seq.id = in.id;
      r->seq.num_tokens = static_cast<int>(in.prompt.size());
      r->num_prompt = r->seq.num_tokens;
      r->tokens = std::move(in.prompt);
      r->params = std::move(in.params);
      r->rng.seed(r->params.has_seed ? r->params.seed : (static_cast<uint64_t>(seed_source_()) << 32) ^ seed_source_());
      scheduler_.add(&r->seq);
      requests_[in.id] = std::move(r);
    }
    for (int64_t id : aborts) {
      auto it = requests_.find(id);
      if (it != requests_.end()) finish(*it->second, "abort");
    }
    if (!scheduler_.idle()) {
      try {
        step();
      } catch (const std::exception& e) {
        // A bug, not a client error: fail the requests rather than the process.
        std::fprintf(stderr, "pyserve engine: step failed: %s\n", e.what());
        std::vector<int64_t> ids;
        for (auto& kv : requests_) ids.push_back(kv.first);
        for (int64_t id : ids) finish(*requests_[id], "abort");
      }
    }
    update_stats();
    publish();
  }
  // Shutdown: every request still here ends as aborted.
  std::vector<int64_t> ids;
  for (auto& kv : requests_) ids.push_back(kv.first);
  for (int64_t id : ids) finish(*requests_[id], "abort");
  update_stats();
  publish();
}

void Engine::step() {
  std::vector<ScheduledChunk> plan = scheduler_.schedule();
  for (Sequence* s : scheduler_.take_rejected()) finish(*requests_.at(s->id), "length");
  if (plan.empty()) return;

  batch_.clear();
  int64_t prompt_tokens = 0;
  for (const ScheduledChunk& c : plan) {
    Request& r = *requests_.at(c.seq->id);
    for (int i = 0; i < c.count; ++i) {
      batch_.tokens.push_back(r.tokens[c.start + i]);
      batch_.positions.push_back(c.start + i);
      batch_.page_tables.push_back(r.seq.pages.data());
    }
    if (c.sample) batch_.logit_rows.push_back(static_cast<int32_t>(batch_.tokens.size()) - 1);
    if (c.count > 1 || c.start < r.num_prompt) prompt_tokens += c.count;
  }
  const int vocab = model_->config().vocab_size;
  logits_.resize(batch_.logit_rows.size() * static_cast<size_t>(vocab));
  model_->forward(batch_, cache_, logits_.data());

  int row = 0;
  int64_t generated = 0;
  for (const ScheduledChunk& c : plan) {
    Request& r = *requests_.at(c.seq->id);
    r.seq.num_computed += c.count;
    if (!c.sample) continue;
    const float* lg = logits_.data() + static_cast<size_t>(row++) * vocab;
    const int32_t tok = sampler_.sample(lg, vocab, r.params, r.rng);
    r.tokens.push_back(tok);
    r.seq.num_tokens += 1;
    r.num_generated += 1;
    ++generated;
    const auto& eos = config_.eos_token_ids;
    const auto& stops = r.params.stop_token_ids;
    const char* reason = nullptr;
    if (std::find(stops.begin(), stops.end(), tok) != stops.end() ||
        (!r.params.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end()))
      reason = "stop";
    else if ((r.params.max_tokens >= 0 && r.num_generated >= r.params.max_tokens) ||
             r.seq.num_tokens >= std::min<int64_t>(config_.max_model_len, cache_.capacity_tokens()))
      reason = "length";
    emit(r.seq.id, &tok, 1, reason != nullptr, reason, r.num_prompt);
    if (reason) release(r);
  }
  std::lock_guard<std::mutex> lock(stats_mu_);
  stats_.steps += 1;
  stats_.prompt_tokens_computed += prompt_tokens;
  stats_.tokens_generated += generated;
  stats_.preemptions = scheduler_.num_preemptions();
}

}  // namespace pyserve
