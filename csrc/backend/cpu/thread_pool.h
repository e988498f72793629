#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace pyserve::cpu {

// A fixed pool for data-parallel kernels. The calling thread is worker 0, so a pool of N threads
// starts N-1 of its own.
//
// Work is split into chunks that threads claim from an atomic counter, and the caller claims too:
// if a worker is asleep or descheduled (two cores shared with an event loop and other processes),
// the caller simply does its share instead of waiting for it. Workers spin briefly between jobs (a
// decode step issues hundreds of small jobs, and a futex wake each would cost more than the job),
// then sleep on a condition variable.
class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_threads_; }

  // Calls f(begin, end, thread_index) on disjoint slices covering [0, n). One caller at a time.
  // If f throws (on any thread), the first exception is rethrown here once every thread has left
  // the job; the slices not yet claimed are skipped.
  // chunks_per_thread: how finely [0, n) is cut (more: better balance when a thread is late;
  // fewer: longer contiguous runs per thread).
  template <class F>
  void parallel_for(int64_t n, F&& f, int chunks_per_thread = 4) {
    if (n <= 0) return;
    if (num_threads_ == 1 || n == 1) {
      f(int64_t{0}, n, 0);
      return;
    }
    using Fn = std::remove_reference_t<F>;
    Job job;
    job.fn = [](void* ctx, int64_t b, int64_t e, int t) { (*static_cast<Fn*>(ctx))(b, e, t); };
    job.ctx = const_cast<void*>(static_cast<const void*>(&f));
    job.n = n;
    job.chunks = std::min<int64_t>(n, static_cast<int64_t>(chunks_per_thread) * num_threads_);
    run(job);
  }

 private:
  struct Job {
    void (*fn)(void*, int64_t, int64_t, int) = nullptr;
    void* ctx = nullptr;
    int64_t n = 0;
    int64_t chunks = 0;
    std::atomic<int64_t> next{0};
    uint64_t epoch = 0;
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // written by the thread that set `failed` first
  };
  void run(Job& job);
  static void work_on(Job& job, int thread_index);
  void worker_loop(int index);

  int num_threads_;
  std::vector<std::thread> workers_;
  std::atomic<Job*> job_{nullptr};
  std::atomic<uint64_t> epoch_{0};  // bumped per job; workers poll this, not the pointer
  std::atomic<int> active_{0};  // workers inside the current job
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace pyserve::cpu
