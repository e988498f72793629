#pragma once
// Engine: EngineCore on its own thread. Callers (Python) hand requests in and take output batches
// out through two small locked queues; the engine writes one byte to its own dup of notify_fd
// whenever the output queue goes from empty to non-empty, so an event loop can wait on that fd
// instead of polling.
//
// The thread is a thin loop: take the inbox (requests, aborts), core.step(), publish. Faults inside
// a step are contained by the core. A fault outside it (publishing) ends the requests whose outputs
// were lost with an error; if even that cannot be published the engine has *failed*: failure()
// says why, add_request refuses, and the caller ends what it still waits for.
//
// Shutdown is idempotent and ordered: stop intake -> end every request (inbox included) ->
// publish -> join the thread -> close the fd. No thread outlives the object.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine/engine_core.h"

namespace pyserve {

// One event of the engine's trace, in Chrome's trace-event terms (ph 'X': a span of dur_us; 'i':
// an instant). tid 0 is the engine's steps; any other tid is a request id.
struct TraceEvent {
  std::string name;
  char ph = 'i';
  int64_t ts_us = 0, dur_us = 0;
  int64_t tid = 0;
  std::vector<std::pair<std::string, int64_t>> args;
  std::string note;  // a finish reason
};

class Engine {
 public:
  Engine(std::shared_ptr<LlamaModel> model, EngineConfig config);
  ~Engine();  // shutdown()
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Throws std::invalid_argument for a bad request (checked here, on the caller's thread), and
  // std::runtime_error once the engine is shut down or has failed.
  void add_request(int64_t id, std::vector<int32_t> prompt, SamplingParams params);
  // Every choice of the request (index < 0) or just one; unknown or finished ones are ignored.
  void abort(int64_t id, int index = -1);
  std::vector<EngineOutput> fetch();
  EngineStats stats() const;
  // Ends every request (queued ones too) with "abort" and empties the prefix cache; takes effect
  // at the engine thread's next look at its inbox.
  void reset();
  // The event trace (config.tracing), oldest first; the most recent kMaxTraceEvents are kept.
  std::vector<TraceEvent> trace() const;
  static constexpr size_t kMaxTraceEvents = 100000;
  // Empty while the engine works; why it stopped working once it has failed.
  std::optional<std::string> failure() const;
  void shutdown();
  const EngineConfig& config() const { return config_; }

  // Test-only: see FaultSwitch. Takes effect at the engine thread's next look at its inbox.
  void inject_fault(Phase phase, int64_t at_step, int64_t request, bool alloc, int times);

 private:
  struct Incoming {
    int64_t id;
    std::vector<int32_t> prompt;
    SamplingParams params;
    int64_t queued_us;
  };
  static int64_t now_us();
  void record(TraceEvent e);
  void trace_step(int64_t start_us, int64_t end_us);
  void trace_finishes(const std::vector<EngineOutput>& outputs);
  void loop();
  void intake(std::vector<Incoming>& incoming, std::vector<std::pair<int64_t, int>>& aborts);
  void deliver();                 // core outputs -> outbox, containing a failed publish
  void publish(std::vector<EngineOutput>& outputs);
  void fail_engine(const std::string& why);
  void update_stats();
  void notify();

  EngineConfig config_;
  EngineCore core_;  // engine thread only
  int notify_fd_ = -1;  // our own dup: closed after the thread is joined

  mutable std::mutex in_mu_;
  std::condition_variable in_cv_;
  std::vector<Incoming> inbox_;
  std::vector<std::pair<int64_t, int>> aborts_;  // (id, index or -1)
  struct PendingFault { Phase phase; int64_t at_step, request; bool alloc; int times; };
  std::vector<PendingFault> faults_;
  std::optional<size_t> reset_before_;  // reset() asked for: ends the first *reset_before_ of inbox_
  bool stop_ = false;       // intake closed
  bool failed_ = false;     // the engine gave up (failure_ says why)

  mutable std::mutex out_mu_;
  std::vector<EngineOutput> outbox_;
  std::unordered_map<int64_t, size_t> outbox_index_;
  std::string failure_;

  mutable std::mutex trace_mu_;
  std::deque<TraceEvent> trace_;

  mutable std::mutex stats_mu_;
  EngineStats stats_;

  std::mutex shutdown_mu_;  // a second shutdown() waits for the first to finish
  bool shut_down_ = false;
  std::thread thread_;
};

}  // namespace pyserve
