#include "backend/cpu/thread_pool.h"

#if defined(PYSERVE_X86)
#include <immintrin.h>
#define PYSERVE_PAUSE() _mm_pause()
#else
#define PYSERVE_PAUSE() std::this_thread::yield()
#endif

namespace pyserve::cpu {

namespace {
constexpr int kSpinBeforeSleep = 1 << 14;  // roughly half a millisecond of polling between jobs
constexpr int kSpinBeforeYield = 1 << 8;   // waiting on a descheduled worker: let it run
}  // namespace

ThreadPool::ThreadPool(int num_threads) : num_threads_(num_threads < 1 ? 1 : num_threads) {
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::work_on(Job& job, int thread_index) {
  try {
    for (;;) {
      const int64_t c = job.next.fetch_add(1, std::memory_order_relaxed);
      if (c >= job.chunks) return;
      const int64_t b = job.n * c / job.chunks, e = job.n * (c + 1) / job.chunks;
      job.fn(job.ctx, b, e, thread_index);
    }
  } catch (...) {
    // Never let an exception end a worker thread (std::terminate): hand it to the caller.
    if (!job.failed.exchange(true)) job.error = std::current_exception();
    job.next.store(job.chunks);  // the others stop claiming work
  }
}

void ThreadPool::run(Job& job) {
  job.epoch = epoch_.load(std::memory_order_relaxed) + 1;
  job_.store(&job);  // seq_cst: pairs with the workers' re-check in worker_loop
  epoch_.store(job.epoch);
  {
    std::lock_guard<std::mutex> lock(mutex_);  // no lost wake-up for a worker about to sleep
  }
  wake_.notify_all();
  work_on(job, 0);  // never throws: a failure is recorded in the job
  job_.store(nullptr);
  // Workers that entered the job may still run a chunk; the job lives on this stack frame.
  int spins = 0;
  while (active_.load() != 0) {
    if (++spins < kSpinBeforeYield) PYSERVE_PAUSE(); else std::this_thread::yield();
  }
  if (job.failed.load()) std::rethrow_exception(job.error);
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  int idle = 0;
  for (;;) {
    if (stop_.load(std::memory_order_relaxed)) return;
    const uint64_t e = epoch_.load();
    if (e == seen) {
      if (++idle < kSpinBeforeSleep) {
        PYSERVE_PAUSE();
        continue;
      }
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_.load() || epoch_.load() != seen; });
      idle = 0;
      continue;
    }
    seen = e;
    idle = 0;
    Job* job = job_.load();
    if (job == nullptr) continue;  // the caller already finished it alone
    active_.fetch_add(1);
    // Only once counted in active_ may we touch the job, and only if it is still published.
    if (job_.load() == job && job->epoch == e) work_on(*job, index);
    active_.fetch_sub(1);
  }
}

}  // namespace pyserve::cpu
