#pragma once
// A test-only fault switch: makes a chosen engine phase throw at a chosen step, so tests can prove
// that every failure path ends the affected requests with an error and leaves the rest running.
// Disarmed (the default) it costs one predictable branch per check.
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>

namespace pyserve {

enum class Phase { intake, plan, build, run, accept, commit, publish };

inline const char* phase_name(Phase p) {
  switch (p) {
    case Phase::intake: return "intake";
    case Phase::plan: return "plan";
    case Phase::build: return "build";
    case Phase::run: return "run";
    case Phase::accept: return "accept";
    case Phase::commit: return "commit";
    case Phase::publish: return "publish";
  }
  return "?";
}

inline Phase parse_phase(const std::string& name) {
  for (Phase p : {Phase::intake, Phase::plan, Phase::build, Phase::run, Phase::accept, Phase::commit, Phase::publish})
    if (name == phase_name(p)) return p;
  throw std::invalid_argument("unknown engine phase '" + name +
                              "' (intake, plan, build, run, accept, commit, publish)");
}

class FaultSwitch {
 public:
  // From step `at_step` on (steps count from 1; 0: the next check), the phase throws `times` times
  // (< 0: every time). request >= 0 limits it to that request's work in intake / build / accept /
  // commit. alloc: throw std::bad_alloc (a failed allocation) instead of std::runtime_error.
  void arm(Phase phase, int64_t at_step, int64_t request, bool alloc, int times) {
    armed_ = times != 0;
    phase_ = phase;
    at_step_ = at_step;
    request_ = request;
    alloc_ = alloc;
    times_ = times;
  }
  void disarm() { armed_ = false; }
  int64_t fired() const { return fired_; }

  void check(Phase phase, int64_t step, int64_t request = -1) {
    if (!armed_ || phase != phase_ || step < at_step_) return;
    if (request_ >= 0 && request != request_) return;
    ++fired_;
    if (times_ > 0 && --times_ == 0) armed_ = false;
    if (alloc_) throw std::bad_alloc();
    throw std::runtime_error(std::string("injected fault in ") + phase_name(phase) + " at step " +
                             std::to_string(step));
  }

 private:
  bool armed_ = false;
  Phase phase_ = Phase::intake;
  int64_t at_step_ = 0, request_ = -1;
  bool alloc_ = false;
  int times_ = 0;
  int64_t fired_ = 0;
};

}  // namespace pyserve
