#include "engine/engine.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
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
  const int vocab = model_->config().vocab_size;
  params.validate(vocab);
  if (id < 0 || id >= (int64_t{1} << 54)) throw std::invalid_argument("request id out of range");
  if (prompt.empty()) throw std::invalid_argument("the prompt has no tokens");
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

void Engine::abort(int64_t id, int index) {
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    aborts_.emplace_back(id, index);
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

EngineOutput& Engine::emit(const Request& r, bool finished, const char* reason) {
  EngineOutput o;
  o.id = r.id;
  o.index = r.index;
  o.finished = finished;
  o.finish_reason = reason ? reason : "";
  o.num_prompt_tokens = r.num_prompt;
  pending_out_.push_back(std::move(o));
  return pending_out_.back();
}

void Engine::publish() {
  if (pending_out_.empty()) return;
  bool was_empty;
  {
    std::lock_guard<std::mutex> lock(out_mu_);
    was_empty = outbox_.empty();
    for (EngineOutput& o : pending_out_) {
      // A slow reader gets one merged entry per choice rather than one per step.
      const int64_t k = key(o.id, o.index);
      auto it = outbox_index_.find(k);
      if (it == outbox_index_.end()) {
        outbox_index_[k] = outbox_.size();
        outbox_.push_back(std::move(o));
      } else {
        EngineOutput& m = outbox_[it->second];
        m.tokens.insert(m.tokens.end(), o.tokens.begin(), o.tokens.end());
        m.logprobs.insert(m.logprobs.end(), std::make_move_iterator(o.logprobs.begin()),
                          std::make_move_iterator(o.logprobs.end()));
        if (o.has_prompt_logprobs) {
          m.has_prompt_logprobs = true;
          m.prompt_logprobs = std::move(o.prompt_logprobs);
        }
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
  requests_.erase(key(r.id, r.index));  // r is gone after this line
}

void Engine::finish(Request& r, const char* reason) {
  emit(r, true, reason);
  release(r);
}

void Engine::update_stats() {
  std::lock_guard<std::mutex> lock(stats_mu_);
  stats_.num_running = static_cast<int>(scheduler_.running().size());
  stats_.num_waiting = static_cast<int>(scheduler_.waiting().size());
  stats_.kv_pages_used = pool_.num_used();
}

void Engine::seed_rng(Request& r) {
  if (r.params.has_seed)
    r.rng.seed(r.params.seed + static_cast<uint64_t>(r.index));
  else
    r.rng.seed((static_cast<uint64_t>(seed_source_()) << 32) ^ seed_source_());
}

void Engine::loop() {
  const int vocab = model_->config().vocab_size;
  for (;;) {
    std::vector<Incoming> incoming;
    std::vector<std::pair<int64_t, int>> aborts;
    {
      std::unique_lock<std::mutex> lock(in_mu_);
      in_cv_.wait(lock, [&] { return stop_ || !inbox_.empty() || !aborts_.empty() || !scheduler_.idle(); });
      if (stop_) break;
      incoming.swap(inbox_);
      aborts.swap(aborts_);
    }
    for (Incoming& in : incoming) {
      auto live = requests_.lower_bound(key(in.id, 0));
      if (live != requests_.end() && live->second->id == in.id) {
        // A duplicate of a live id is the caller's bug: refuse the newcomer (the live request's
        // stream will see one extra "abort"; ids from AsyncEngine are never reused).
        std::fprintf(stderr, "pyserve engine: request id %lld is already live; refused\n", static_cast<long long>(in.id));
        continue;
      }
      auto r = std::make_unique<Request>();
      r->id = in.id;
      r->seq.id = key(in.id, 0);
      r->seq.num_tokens = static_cast<int>(in.prompt.size());
      r->num_prompt = r->seq.num_tokens;
      r->tokens = std::move(in.prompt);
      r->params = std::move(in.params);
      r->prompt_logprobs_done = r->params.prompt_logprobs < 0;
      if (r->params.penalised()) {
        r->history = std::make_unique<TokenHistory>();
        r->history->add_prompt(r->tokens, vocab);
      }
      seed_rng(*r);
      scheduler_.add(&r->seq);
      requests_[r->seq.id] = std::move(r);
    }
    for (const auto& [id, index] : aborts) {
      for (auto it = requests_.lower_bound(key(id, 0)); it != requests_.end() && it->second->id == id;) {
        Request& r = *it->second;
        ++it;  // finish() erases r
        if (index >= 0 && r.index != index) continue;
        // Choice 0 of an n > 1 request that has not forked yet stands for all of its choices:
        // report every one of them, or a consumer waiting for n ends would wait forever.
        if (r.index == 0 && !r.forked && r.params.n > 1)
          for (int i = 1; i < r.params.n; ++i) {
            EngineOutput& o = emit(r, true, "abort");
            o.index = i;
          }
        finish(r, "abort");
      }
    }
    if (!scheduler_.idle()) {
      try {
        if (!step()) {
          // Work queued but nothing schedulable: must not happen (the scheduler reclaims pages
          // before it gives up), but never spin on it either.
          std::unique_lock<std::mutex> lock(in_mu_);
          in_cv_.wait_for(lock, std::chrono::milliseconds(5));
        }
      } catch (const std::exception& e) {
        // A bug, not a client error: fail the requests rather than the process.
        std::fprintf(stderr, "pyserve engine: step failed: %s\n", e.what());
        while (!requests_.empty()) finish(*requests_.begin()->second, "abort");
      }
    }
    update_stats();
    publish();
  }
  // Shutdown: every request still here ends as aborted.
  while (!requests_.empty()) finish(*requests_.begin()->second, "abort");
  update_stats();
  publish();
}

void Engine::fork(Request& parent) {
  // The other choices share every page that lies wholly before the one holding the last prompt
  // token, and recompute the rest themselves (< one page): no page is written by two sequences,
  // and their logits come out bit-identical to the parent's (the kernels are batch-invariant).
  const int ps = config_.page_size;
  const int shared_pages = (parent.num_prompt - 1) / ps;
  for (int i = 1; i < parent.params.n; ++i) {
    auto c = std::make_unique<Request>();
    c->id = parent.id;
    c->index = i;
    c->seq.id = key(parent.id, i);
    c->tokens.assign(parent.tokens.begin(), parent.tokens.begin() + parent.num_prompt);
    c->num_prompt = parent.num_prompt;
    c->seq.num_tokens = parent.num_prompt;
    c->params = parent.params;
    c->prompt_logprobs_done = true;
    c->forked = true;  // only choice 0 forks
    if (parent.history) {
      c->history = std::make_unique<TokenHistory>();
      c->history->add_prompt(c->tokens, model_->config().vocab_size);
    }
    for (int p = 0; p < shared_pages && p < static_cast<int>(parent.seq.pages.size()); ++p) {
      pool_.retain(parent.seq.pages[p]);
      c->seq.pages.push_back(parent.seq.pages[p]);
    }
    c->seq.num_computed = static_cast<int>(c->seq.pages.size()) * ps;
    seed_rng(*c);
    requests_[c->seq.id] = std::move(c);
  }
  // Front of the queue in index order.
  for (int i = parent.params.n - 1; i >= 1; --i) scheduler_.add_front(&requests_.at(key(parent.id, i))->seq);
  parent.forked = true;
}

bool Engine::step() {
  std::vector<ScheduledChunk> plan = scheduler_.schedule();
  const std::vector<Sequence*> rejected = scheduler_.take_rejected();
  for (Sequence* s : rejected) finish(*requests_.at(s->id), "length");
  if (plan.empty()) return !rejected.empty();

  batch_.clear();
  rows_.clear();
  int64_t prompt_tokens = 0;
  for (const ScheduledChunk& c : plan) {
    Request& r = *requests_.at(c.seq->id);
    const int base = static_cast<int>(batch_.tokens.size());
    for (int i = 0; i < c.count; ++i) {
      batch_.tokens.push_back(r.tokens[c.start + i]);
      batch_.positions.push_back(c.start + i);
      batch_.page_tables.push_back(r.seq.pages.data());
    }
    // Logit rows: every prompt position when prompt logprobs are wanted, else just the last.
    const bool prompt_rows = !r.prompt_logprobs_done && c.start < r.num_prompt;
    const int first = prompt_rows ? 0 : c.count - 1;
    const int n_rows = prompt_rows ? c.count : (c.sample ? 1 : 0);
    const int first_row = static_cast<int>(batch_.logit_rows.size());
    for (int i = first; i < first + n_rows; ++i) batch_.logit_rows.push_back(base + i);
    rows_.push_back({&r, first_row, n_rows, c.start + first, c.sample, c.count});
    if (c.count > 1 || c.start < r.num_prompt) prompt_tokens += c.count;
  }
  const int vocab = model_->config().vocab_size;
  logits_.resize(batch_.logit_rows.size() * static_cast<size_t>(vocab));
  model_->forward(batch_, cache_, logits_.data());

  int64_t generated = 0;
  const auto& eos = config_.eos_token_ids;
  for (const RowUse& u : rows_) {
    Request& r = *u.req;
    r.seq.num_computed += u.count;
    // Prompt logprobs: the row at position p scores the prompt token at p + 1.
    if (!r.prompt_logprobs_done && u.rows > 0) {
      for (int j = 0; j < u.rows; ++j) {
        const int pos = u.first_pos + j;
        if (pos + 1 >= r.num_prompt) break;
        if (pos != static_cast<int>(r.prompt_logprobs.size())) continue;  // recomputed after preemption
        const float* lg = logits_.data() + static_cast<size_t>(u.first_row + j) * vocab;
        r.prompt_logprobs.push_back(token_logprob(lg, vocab, r.tokens[pos + 1], r.params.prompt_logprobs));
      }
      if (r.seq.num_computed >= r.num_prompt) r.prompt_logprobs_done = true;
    }
    if (!u.sample) continue;
    const float* lg = logits_.data() + static_cast<size_t>(u.first_row + u.rows - 1) * vocab;
    if (r.params.n > 1 && !r.forked) fork(r);
    TokenLogprob lp;
    const int32_t tok = sampler_.sample(lg, vocab, r.params, r.rng, r.history.get(), r.num_generated, eos, &lp);
    r.tokens.push_back(tok);
    r.seq.num_tokens += 1;
    r.num_generated += 1;
    if (r.history) r.history->add_generated(tok, vocab);
    ++generated;
    const auto& stops = r.params.stop_token_ids;
    const char* reason = nullptr;
    if (std::find(stops.begin(), stops.end(), tok) != stops.end() ||
        (!r.params.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end()))
      reason = "stop";
    else if ((r.params.max_tokens >= 0 && r.num_generated >= r.params.max_tokens) ||
             r.seq.num_tokens >= std::min<int64_t>(config_.max_model_len, cache_.capacity_tokens()))
      reason = "length";
    EngineOutput& o = emit(r, reason != nullptr, reason);
    o.tokens.push_back(tok);
    if (r.params.logprobs >= 0) o.logprobs.push_back(std::move(lp));
    if (r.params.prompt_logprobs >= 0 && r.index == 0 && r.num_generated == 1) {
      o.has_prompt_logprobs = true;
      o.prompt_logprobs = std::move(r.prompt_logprobs);
    }
    if (reason) release(r);
  }
  std::lock_guard<std::mutex> lock(stats_mu_);
  stats_.steps += 1;
  stats_.prompt_tokens_computed += prompt_tokens;
  stats_.tokens_generated += generated;
  stats_.preemptions = scheduler_.num_preemptions();
  return true;
}

}  // namespace pyserve
