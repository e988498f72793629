#include "engine/engine.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <system_error>

namespace pyserve {

Engine::Engine(std::shared_ptr<LlamaModel> model, EngineConfig config)
    : config_(config), core_(std::move(model), std::move(config)) {
  if (config_.notify_fd >= 0) {
    // Our own descriptor: the caller may close theirs whenever it likes.
    notify_fd_ = ::fcntl(config_.notify_fd, F_DUPFD_CLOEXEC, 0);
    if (notify_fd_ < 0) throw std::system_error(errno, std::generic_category(), "dup of the notify fd");
  }
  stats_ = core_.stats();
  try {
    thread_ = std::thread([this] { loop(); });
  } catch (...) {
    if (notify_fd_ >= 0) ::close(notify_fd_);
    throw;
  }
}

Engine::~Engine() { shutdown(); }

void Engine::shutdown() {
  std::lock_guard<std::mutex> once(shutdown_mu_);
  if (shut_down_) return;
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    stop_ = true;  // 1. intake closed: add_request throws from here on
  }
  in_cv_.notify_all();
  // 2-3. The thread ends every request (the inbox's too), publishes, and returns.
  if (thread_.joinable()) thread_.join();
  // 4. Nobody writes to the fd any more.
  if (notify_fd_ >= 0) {
    ::close(notify_fd_);
    notify_fd_ = -1;
  }
  shut_down_ = true;
}

void Engine::add_request(int64_t id, std::vector<int32_t> prompt, SamplingParams params) {
  core_.check_request(id, prompt, params);
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    if (failed_) throw std::runtime_error("the engine has failed: " + failure().value_or(""));
    if (stop_) throw std::runtime_error("the engine is shut down");
    inbox_.push_back({id, std::move(prompt), std::move(params), config_.tracing ? now_us() : 0});
  }
  in_cv_.notify_one();
}

void Engine::abort(int64_t id, int index) {
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    if (stop_ || failed_) return;  // every request has ended, or is about to
    aborts_.emplace_back(id, index);
  }
  in_cv_.notify_one();
}

void Engine::reset() {
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    if (stop_ || failed_) return;
    reset_before_ = inbox_.size();  // what is queued now ends; what comes later is served
  }
  in_cv_.notify_one();
}

int64_t Engine::now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Engine::record(TraceEvent e) {
  std::lock_guard<std::mutex> lock(trace_mu_);
  trace_.push_back(std::move(e));
  if (trace_.size() > kMaxTraceEvents) trace_.pop_front();
}

std::vector<TraceEvent> Engine::trace() const {
  std::lock_guard<std::mutex> lock(trace_mu_);
  return std::vector<TraceEvent>(trace_.begin(), trace_.end());
}

void Engine::trace_step(int64_t start_us, int64_t end_us) {
  const auto& chunks = core_.last_step();
  if (chunks.empty()) return;
  int64_t decodes = 0, prefills = 0, tokens = 0;
  for (const EngineCore::StepChunk& c : chunks) {
    (c.prefill ? prefills : decodes) += 1;
    tokens += c.count;
    TraceEvent e;
    e.name = c.prefill ? "prefill" : "decode";
    e.ph = 'X';
    e.ts_us = start_us;
    e.dur_us = end_us - start_us;
    e.tid = c.id;
    e.args = {{"index", c.index}, {"start", c.start}, {"tokens", c.count}};
    if (c.prefill) e.args.emplace_back("cached", c.cached);
    record(std::move(e));
  }
  const EngineStats st = core_.stats();
  TraceEvent step;
  step.name = "step";
  step.ph = 'X';
  step.ts_us = start_us;
  step.dur_us = end_us - start_us;
  step.args = {{"step", core_.step_index()}, {"decodes", decodes}, {"prefill_chunks", prefills}, {"tokens", tokens},
               {"running", st.num_running}, {"waiting", st.num_waiting}, {"kv_pages_used", st.kv_pages_used},
               {"kv_pages_cached", st.kv_pages_cached}};
  record(std::move(step));
}

void Engine::trace_finishes(const std::vector<EngineOutput>& outputs) {
  const int64_t now = now_us();
  for (const EngineOutput& o : outputs) {
    if (!o.finished) continue;
    TraceEvent e;
    e.name = "finish";
    e.ts_us = now;
    e.tid = o.id;
    e.args = {{"index", o.index}};
    e.note = o.finish_reason;
    record(std::move(e));
  }
}

void Engine::inject_fault(Phase phase, int64_t at_step, int64_t request, bool alloc, int times) {
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    faults_.push_back({phase, at_step, request, alloc, times});
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

std::optional<std::string> Engine::failure() const {
  std::lock_guard<std::mutex> lock(out_mu_);
  if (failure_.empty()) return std::nullopt;
  return failure_;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

void Engine::update_stats() {
  EngineStats s = core_.stats();
  std::lock_guard<std::mutex> lock(stats_mu_);
  stats_ = s;
}

void Engine::notify() {
  if (notify_fd_ < 0) return;
  const char byte = 1;
  // Non-blocking socket: if it is full, the reader is already awake.
  ssize_t ignored = ::write(notify_fd_, &byte, 1);
  (void)ignored;
}

void Engine::publish(std::vector<EngineOutput>& outputs) {
  if (outputs.empty()) return;
  bool was_empty;
  {
    std::lock_guard<std::mutex> lock(out_mu_);
    was_empty = outbox_.empty();
    for (EngineOutput& o : outputs) {
      // A slow reader gets one merged entry per choice rather than one per step.
      const int64_t k = request_key(o.id, o.index);
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
        m.error = o.error;
      }
    }
  }
  outputs.clear();
  if (was_empty) notify();
}

void Engine::deliver() {
  std::vector<EngineOutput> outputs = core_.take_outputs();
  if (outputs.empty()) return;
  if (config_.tracing) trace_finishes(outputs);
  std::vector<std::pair<int64_t, int>> touched;
  touched.reserve(outputs.size());
  for (const EngineOutput& o : outputs) touched.emplace_back(o.id, o.index);
  try {
    core_.faults().check(Phase::publish, core_.step_index());
    publish(outputs);
  } catch (const std::exception& e) {
    // Those outputs are lost (perhaps partly): end each choice they concerned with an error, and
    // publish that. If this fails too, loop() gives up on the engine.
    const std::string message = std::string("engine fault while publishing outputs: ") + e.what();
    std::fprintf(stderr, "pyserve engine: %s\n", message.c_str());
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (const auto& [id, index] : touched) core_.emit_replacement_end(id, index, message);
    std::vector<EngineOutput> replacements = core_.take_outputs();
    try {
      core_.faults().check(Phase::publish, core_.step_index());
      publish(replacements);
    } catch (const std::exception& again) {
      throw std::runtime_error(message + "; and again while publishing their errors: " + again.what());
    }
  }
}

void Engine::fail_engine(const std::string& why) {
  std::fprintf(stderr, "pyserve engine: FAILED, no longer serving: %s\n", why.c_str());
  {
    std::lock_guard<std::mutex> lock(in_mu_);
    failed_ = true;
    inbox_.clear();
    aborts_.clear();
  }
  try {
    core_.end_all("error", "the engine failed: " + why);
    std::vector<EngineOutput> ends = core_.take_outputs();
    publish(ends);
  } catch (...) {
    // The caller learns of the failure from failure() and ends what it waits for itself.
  }
  {
    std::lock_guard<std::mutex> lock(out_mu_);
    failure_ = why.empty() ? "unknown fault" : why;
  }
  try {
    update_stats();
  } catch (...) {
  }
  notify();
}

void Engine::intake(std::vector<Incoming>& incoming, std::vector<std::pair<int64_t, int>>& aborts) {
  for (Incoming& in : incoming) {
    const int64_t id = in.id;
    if (config_.tracing) {
      TraceEvent e;
      e.name = "queued";
      e.ts_us = in.queued_us;
      e.tid = id;
      e.args = {{"prompt_tokens", static_cast<int64_t>(in.prompt.size())}, {"n", std::max(in.params.n, 1)}};
      record(std::move(e));
    }
    const int n = std::max(in.params.n, 1);
    const int num_prompt = static_cast<int>(in.prompt.size());
    try {
      core_.add_request(id, std::move(in.prompt), std::move(in.params));
    } catch (const std::exception& e) {
      core_.reject(id, n, num_prompt, e.what());
    }
  }
  for (const auto& [id, index] : aborts) core_.abort(id, index);
}

void Engine::loop() {
  for (;;) {
    std::vector<Incoming> incoming;
    std::vector<std::pair<int64_t, int>> aborts;
    std::vector<PendingFault> faults;
    bool stopping, failed;
    std::optional<size_t> reset_before;
    {
      std::unique_lock<std::mutex> lock(in_mu_);
      in_cv_.wait(lock, [&] {
        return stop_ || reset_before_ || !inbox_.empty() || !aborts_.empty() || !faults_.empty() ||
               (!failed_ && !core_.idle());
      });
      stopping = stop_;
      failed = failed_;
      reset_before = reset_before_;
      reset_before_.reset();
      incoming.swap(inbox_);
      aborts.swap(aborts_);
      faults.swap(faults_);
    }
    if (failed) {
      if (stopping) return;
      continue;  // a failed engine only waits to be shut down
    }
    try {
      for (const PendingFault& f : faults) core_.faults().arm(f.phase, f.at_step, f.request, f.alloc, f.times);
      if (stopping) {
        // Shutdown: requests still in the inbox and every live one end as aborted.
        for (Incoming& in : incoming) core_.reject(in.id, std::max(in.params.n, 1), static_cast<int>(in.prompt.size()), "");
        core_.end_all("abort", "");
        update_stats();
        deliver();
        return;
      }
      if (reset_before) {
        // reset_engine: everything live and what was queued before it end as aborted; the cache
        // empties; requests that came after it are served.
        const auto first_after = incoming.begin() + static_cast<std::ptrdiff_t>(*reset_before);
        for (auto it = incoming.begin(); it != first_after; ++it)
          core_.reject(it->id, std::max(it->params.n, 1), static_cast<int>(it->prompt.size()), "");
        incoming.erase(incoming.begin(), first_after);
        core_.end_all("abort", "");
        core_.reset_cache();
      }
      intake(incoming, aborts);
      const int64_t start = config_.tracing ? now_us() : 0;
      const bool ran = core_.step();
      if (config_.tracing && ran) trace_step(start, now_us());
      update_stats();  // before the outputs: a consumer that sees them sees the stats of that step
      deliver();
      if (!ran && !core_.idle()) {
        // Work queued but nothing schedulable: must not happen (the scheduler reclaims pages
        // before it gives up), but never spin on it either.
        std::unique_lock<std::mutex> lock(in_mu_);
        in_cv_.wait_for(lock, std::chrono::milliseconds(5));
      }
    } catch (const std::exception& e) {
      fail_engine(e.what());
    } catch (...) {
      fail_engine("unknown exception");
    }
    if (stopping) return;
  }
}

}  // namespace pyserve
